"""The device side never imports torch, transformers or optimum (and the host entry points only on first use).

In a fresh interpreter, import the core modules and every module under ``runtime/``
(``edgekv.runtime.*``, found with pkgutil so that new modules are covered), and check
``sys.modules`` after each import to name the module that pulled a forbidden package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from textwrap import dedent

CORE = ["edgekv", "edgekv.errors", "edgekv.units", "edgekv.format", "edgekv.quant", "edgekv.rope",
        "edgekv.retrieval", "edgekv.modelshape", "edgekv.budget", "edgekv.cli", "edgekv.format.update",
        "edgekv.index", "edgekv.updates", "edgekv.commands.memory"]
FORBIDDEN = ["torch", "transformers", "optimum"]

SCRIPT = dedent('''
    import importlib, json, pkgutil, sys
    core, forbidden = json.loads(sys.argv[1]), json.loads(sys.argv[2])

    def pulled():
        return sorted(m for m in sys.modules if m.split(".")[0] in forbidden)

    report = {"imported": [], "offenders": {}}
    def load(name):
        before = set(pulled())
        importlib.import_module(name)
        report["imported"].append(name)
        new = sorted(set(pulled()) - before)
        if new:
            report["offenders"][name] = new[:5]

    load("edgekv.runtime")
    import edgekv.runtime
    runtime = sorted(m.name for m in pkgutil.walk_packages(edgekv.runtime.__path__, "edgekv.runtime."))
    for name in core + runtime:
        load(name)
    report["runtime_modules"] = runtime
    report["forbidden_loaded"] = pulled()
    print(json.dumps(report))
''')


def test_device_side_imports_no_torch_transformers_optimum():
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CORE), json.dumps(FORBIDDEN)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["offenders"] == {}, f"modules that pull host packages: {report['offenders']}"
    assert report["forbidden_loaded"] == []
    # the discovery found runtime/'s modules (the ones that exist at the time of writing, at least)
    assert {"edgekv.runtime.runtime", "edgekv.runtime.decoder", "edgekv.runtime.tokenizer"} <= \
        set(report["runtime_modules"])
    assert set(CORE) <= set(report["imported"])


# The host model layer and the export entry points import torch only inside the calls that need
# it, so on a device install `edgekv adapt` / `edgekv export` fail with MissingDependencyError
# ("pip install 'edgekv[host]'") instead of an ImportError traceback.
HOST_ENTRY = ["edgekv.host", "edgekv.host.models", "edgekv.host.vlm", "edgekv.host.tokens", "edgekv.export",
              "edgekv.export.common", "edgekv.export.pipeline", "edgekv.export.vlm"]


def test_host_model_layer_and_export_entry_import_torch_on_first_use():
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(HOST_ENTRY), json.dumps(FORBIDDEN)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["offenders"] == {}, f"modules that import host packages at import time: {report['offenders']}"
    assert set(HOST_ENTRY) <= set(report["imported"])


def test_the_check_itself_catches_a_host_import():
    """The same script flags a module that imports torch (so the test above can fail)."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(["edgekv", "json", "torch.nn"]),
                          json.dumps(FORBIDDEN)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and "No module named 'torch'" in res.stderr:
        return  # a device-only environment: there is no torch to pull
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert "torch.nn" in report["offenders"] and "torch" in report["forbidden_loaded"]
