"""The method has a home in the repository, and no tracked file points outside it.

* Every code reference in the docs, written ``path/to/file.py:function`` or
  ``path/to/file.py:Class.method``, names a file of the repository and a name defined in it
  (checked with ``ast``: nothing is imported). docs/method.md must hold enough of them,
  including the functions its equations name, so the check cannot pass vacuously.
* No git-tracked text file names a path outside the repository (a home folder, a scratch
  folder, a checkout beside this one).
* The benchmark report records its command with a relative ``--out``.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"

# a reference: repo-relative path ending in .py, a colon, then a dotted name (or something
# that is not a name, e.g. a line number: reported as malformed rather than skipped)
REF = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py):(\w+(?:\.\w+)*)")
NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")

# the equations of docs/method.md and the functions that compute them: these must be referenced
REQUIRED = {
    "edgekv/retrieval.py:retrieval_weights",
    "edgekv/retrieval.py:effective_keys",
    "edgekv/retrieval.py:fit_projection",
    "edgekv/induction.py:entry_scale",
    "edgekv/induction.py:assemble_memory_kv",
    "edgekv/induce/calibrate.py:Phi.tau",
    "edgekv/induce/calibrate.py:Phi.gates",
    "edgekv/induce/select.py:select",
    "edgekv/induce/select.py:coverage",
    "edgekv/induce/select.py:project_capped_simplex",
    "edgekv/induce/entries.py:pooled_entry_kv",
    "edgekv/bench/metrics.py:last",
    "edgekv/bench/metrics.py:avg",
    "edgekv/bench/metrics.py:bwt",
    "edgekv/bench/metrics.py:forgetting",
}
MIN_METHOD_REFS = 15


def doc_files() -> list[Path]:
    return sorted((ROOT / "docs").glob("**/*.md")) + [ROOT / "README.md"]


def references(text: str) -> list[tuple[int, str, str]]:
    """(line, path, name) of every ``file.py:name`` reference in ``text``."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        out += [(i, m.group(1), m.group(2)) for m in REF.finditer(line)]
    return out


@cache
def definitions(path: Path) -> dict[str, ast.AST]:
    """Top-level names of a module (functions, classes, assignments) -> their nodes."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return body_names(tree.body)


def body_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


def resolve(path: str, name: str) -> str | None:
    """None when ``path:name`` is defined, else why not."""
    if not NAME.fullmatch(name):
        return f"{name!r} is not a name (line numbers go stale: name the function)"
    file = ROOT / path
    if not file.is_file():
        return f"{path} does not exist"
    scope = definitions(file)
    parts = name.split(".")
    for depth, part in enumerate(parts):
        node = scope.get(part)
        if node is None:
            where = path if depth == 0 else f"{path}:{'.'.join(parts[:depth])}"
            return f"{part!r} is not defined in {where}"
        if depth < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                return f"{'.'.join(parts[: depth + 1])} in {path} is not a class"
            scope = body_names(node.body)
    return None


def test_reference_pattern():
    text = ("`edgekv/induction.py:entry_scale` and edgekv/induce/calibrate.py:Phi.tau. "
            "`a/b.py:12`; not: see `x.py`: here, https://host/x.pyc:y")
    assert references(text) == [(1, "edgekv/induction.py", "entry_scale"),
                                 (1, "edgekv/induce/calibrate.py", "Phi.tau"), (1, "a/b.py", "12")]
    assert resolve("edgekv/induction.py", "entry_scale") is None
    assert resolve("edgekv/induce/calibrate.py", "Phi.tau") is None
    assert "not defined" in resolve("edgekv/induction.py", "no_such_function")
    assert "not defined" in resolve("edgekv/induce/calibrate.py", "Phi.no_such_method")
    assert "does not exist" in resolve("edgekv/no_such_file.py", "f")
    assert "not a name" in resolve("edgekv/induction.py", "12")


def test_method_doc_exists_and_names_its_functions():
    assert METHOD.is_file(), "docs/method.md is the method's home"
    refs = {f"{p}:{n}" for _, p, n in references(METHOD.read_text(encoding="utf-8"))}
    assert len(refs) >= MIN_METHOD_REFS, f"docs/method.md names only {len(refs)} functions"
    missing = REQUIRED - refs
    assert not missing, f"docs/method.md does not name the function of: {sorted(missing)}"
    text = METHOD.read_text(encoding="utf-8")
    assert "## Deliberate departures from the published method" in text
    assert "## Continual-learning metrics" in text  # the section other files point to


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_references_resolve(doc: Path):
    bad = []
    for line, path, name in references(doc.read_text(encoding="utf-8")):
        why = resolve(path, name)
        if why is not None:
            bad.append(f"{doc.relative_to(ROOT)}:{line}: `{path}:{name}`: {why}")
    assert not bad, "stale code references:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------
# no path outside the repository
# ---------------------------------------------------------------------------------
# built from pieces so that this file does not match itself
_SEP = "/"
OUTSIDE = [".." + _SEP + "shared", "shared" + _SEP + "docs"] + \
    [_SEP + d + _SEP for d in ("work", "tmp", "home", "root", "Users")]


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [p for p in out.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL in its first 8000 bytes, as git decides)."""
    data = path.read_bytes()
    if b"\0" in data[:8000]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_hits(line: str) -> list[str]:
    """The outside-the-repository patterns ``line`` contains."""
    return [p for p in OUTSIDE if p in line]


def test_outside_patterns():
    assert len(OUTSIDE) == 7
    assert outside_hits("see `.." + _SEP + "shared" + _SEP + "docs/x.md`") == [OUTSIDE[0], OUTSIDE[1]]
    assert outside_hits("--out " + _SEP + "work" + _SEP + "bench_out") == [_SEP + "work" + _SEP]
    assert outside_hits('"path": "' + _SEP + "tmp" + _SEP + 'tmpab/memory.ekv.anchors.jsonl"')
    assert not outside_hits("--out bench_out; docs/method.md; benchmarks/results/x.json; out/x.json")


def test_no_tracked_file_points_outside_the_repository():
    bad = []
    for rel in tracked_files():
        if rel == ".git" or rel.startswith(".git/"):
            continue
        path = ROOT / rel
        if path.is_symlink():
            target = os.readlink(path)
            inside = (path.parent / target).resolve()
            if os.path.isabs(target) or ROOT not in (inside, *inside.parents):
                bad.append(f"{rel}: a link to {target}")
            continue
        if not path.is_file():  # deleted in the working tree
            continue
        text = text_of(path)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            hits = outside_hits(line)
            if hits:
                bad.append(f"{rel}:{i}: {', '.join(hits)}: {line.strip()[:120]}")
    assert not bad, "tracked files name paths outside the repository:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------
# what the benchmark report records
# ---------------------------------------------------------------------------------
def test_report_records_a_relative_out(tmp_path):
    from edgekv.bench.report import portable_command, portable_path

    cwd = tmp_path / "repo"
    (cwd / "runs").mkdir(parents=True)
    assert portable_path(str(cwd / "runs" / "a"), str(cwd)) == os.path.join("runs", "a")
    assert portable_path("runs/a", str(cwd)) == os.path.join("runs", "a")
    assert portable_path("../elsewhere/out/", str(cwd)) == "out"
    assert portable_path(str(tmp_path / "elsewhere" / "out"), str(cwd)) == "out"
    assert portable_path(str(cwd), str(cwd)) == "."
    cmd = f"edgekv bench --model tiny-vlm --stream edge6 --out {tmp_path / 'x' / 'bench_out'} --seed 0"
    assert portable_command(cmd, str(cwd)) == "edgekv bench --model tiny-vlm --stream edge6 --out bench_out --seed 0"
    cmd = f"edgekv bench --out={cwd / 'runs' / 'b'} --quick"
    assert portable_command(cmd, str(cwd)) == f"edgekv bench --out={os.path.join('runs', 'b')} --quick"
    assert portable_command("", str(cwd)) == ""
    assert portable_command("edgekv bench --model 'a b' --out", str(cwd)) == "edgekv bench --model 'a b' --out"
