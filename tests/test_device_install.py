"""The device install: ``pip install .`` in a fresh virtualenv brings no torch and runs.

Uses the machine's pip configuration (its package index / wheel cache; offline is fine).
The sources are copied to a temporary folder first so the build leaves nothing in the
checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["pyproject.toml", "README.md", "constraints.txt", "edgekv", "runtime", "export", "devices"]
# import name -> source folder, as pyproject.toml's package-dir maps them
ROOTS = {"edgekv": "edgekv", "edgekv.runtime": "runtime", "edgekv.export": "export", "edgekv.devices": "devices"}
HOST_ONLY = {"torch", "transformers", "optimum", "optimum-onnx", "accelerate", "ray"}


def source_packages() -> set[str]:
    """Every package (folder with __init__.py) in the source tree, by import name."""
    found = set()
    for name, folder in ROOTS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if "__init__.py" in filenames:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    return found


def run(cmd: list[str], cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HNSWLIB_NO_NATIVE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_pip_install_is_torch_free_and_runtime_imports(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], str(tmp_path))
    py, pip = str(venv / "bin" / "python"), str(venv / "bin" / "pip")
    run([pip, "install", "-q", "-c", str(src / "constraints.txt"), str(src)], str(tmp_path))

    installed = {p["name"].lower() for p in json.loads(run([pip, "list", "--format=json"], str(tmp_path)).stdout)}
    assert "edgekv" in installed and {"numpy", "onnxruntime", "hnswlib", "tokenizers"} <= installed
    assert not installed & HOST_ONLY, f"the device install pulled host packages: {installed & HOST_ONLY}"

    check = ("import sys, edgekv, edgekv.runtime, edgekv.cli, edgekv.format; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum')); "
             "print(edgekv.__file__); print(bad)")
    out = run([py, "-c", check], str(tmp_path)).stdout.splitlines()
    assert out[0].startswith(str(venv)), f"imported {out[0]}, not the installed package"
    assert out[1] == "[]"
    assert run([str(venv / "bin" / "edgekv"), "--version"], str(tmp_path)).stdout.startswith("edgekv ")
    prof = run([str(venv / "bin" / "edgekv"), "profile", "--model", "smollm2-135m", "--budget", "16MiB",
                "--pooled-len", "64", "--payload", "int8", "--json"],
               str(tmp_path)).stdout
    assert json.loads(prof)["slot_bytes"] == 762_624

    # every package of the source tree made it into the installed distribution
    listing = ("import importlib.util, json, sys; "
               "print(json.dumps([n for n in json.loads(sys.argv[1]) if importlib.util.find_spec(n) is None]))")
    missing = json.loads(run([py, "-c", listing, json.dumps(sorted(source_packages()))], str(tmp_path)).stdout)
    assert missing == [], f"packages missing from the install (list them in pyproject.toml): {missing}"
