"""Nothing executes from a file: no pickle, eval or remote code on any path that reads
artifacts, memories, models or task data, and chat templates run in a sandbox.

1. An AST scan of ``edgekv/``, ``export/``, ``runtime/`` and ``devices/`` refuses imports of
   pickle-like modules, calls of ``eval``/``exec``/``compile``/``__import__``, ``os.system``
   and ``shell=True``, ``torch.load`` without ``weights_only=True``, ``np.load`` with
   ``allow_pickle=True``, ``yaml.load``, any ``trust_remote_code`` other than a literal
   ``False``, and a ``from_pretrained`` call that does not pass ``trust_remote_code=False``
   (left at None, transformers asks on a terminal whether to run a folder's code). The
   scanner is checked against a file holding each pattern.
2. A model folder carrying custom code (``auto_map`` + a .py file) never runs it.
3. Chat templates that reach for Python internals raise an edgekv error, run nothing, and
   through ``edgekv run`` give exit code 4 and one line.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil

import pytest

from edgekv.errors import CorruptFileError, InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("edgekv", "export", "runtime", "devices")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib", "jsonpickle"}
EXEC_BUILTINS = {"eval", "exec", "compile", "__import__", "execfile"}


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def scan_source(src: str, filename: str) -> list[str]:
    """Every place in ``src`` that could execute or unpickle something from a file."""
    found = []
    for node in ast.walk(ast.parse(src, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not _is_const(node.value, False):
            found.append(f"{where}: trust_remote_code is not a literal False")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if isinstance(node.func, ast.Name) and name in EXEC_BUILTINS:
                found.append(f"{where}: {name}()")
            elif name in ("os.system", "os.popen", "os.execv", "os.execl", "pty.spawn") or last.startswith("popen"):
                found.append(f"{where}: {name}()")
            elif _is_const(_kw(node, "shell"), True):
                found.append(f"{where}: shell=True")
            elif name == "torch.load" and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where}: torch.load without weights_only=True")
            elif last == "load" and name.split(".")[0] in ("np", "numpy") and not _is_const(_kw(node, "allow_pickle"), False) \
                    and _kw(node, "allow_pickle") is not None:
                found.append(f"{where}: np.load with allow_pickle")
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where}: {name}()")
            elif last in ("read_pickle", "unsafe_load"):
                found.append(f"{where}: {name}()")
            elif last == "from_pretrained" and not _is_const(_kw(node, "trust_remote_code"), False):
                found.append(f"{where}: {name}() without trust_remote_code=False")
    return found


def _sources():
    for top in SCANNED:
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(d, f)
                    yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_no_code_execution_or_unpickling_in_the_package():
    sources = list(_sources())
    assert len(sources) > 30 and any(p.startswith("runtime/") for p, _ in sources)
    found = [f for path, src in sources for f in scan_source(src, path)]
    assert found == [], "\n".join(found)


def test_scanner_catches_each_pattern():
    bad = """
import pickle
from marshal import loads
import numpy as np, torch, yaml, os, subprocess
eval("1")
exec("x = 1")
compile("1", "f", "eval")
__import__("os")
os.system("ls")
subprocess.run("ls", shell=True)
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
yaml.load(open("c.yml"))
AutoModel.from_pretrained("folder")
AutoModel.from_pretrained("folder", trust_remote_code=True)
AutoModel.from_pretrained("folder", trust_remote_code=flag)
"""
    found = scan_source(bad, "bad.py")
    assert {int(f.split(":")[1]) for f in found} == set(range(2, 18)) - {4}, "\n".join(found)  # every line but 4
    ok = """
model.eval()
re.compile("x")
torch.load("w.pt", weights_only=True)
np.load("a.npy")
AutoModel.from_pretrained("folder", trust_remote_code=False)
subprocess.run([sys.executable, "-c", PROBE])
"""
    assert scan_source(ok, "ok.py") == []


# --- a model folder with custom code ----------------------------------------------------
EVIL_PY = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def test_model_folder_custom_code_is_never_run(tiny_model_dir, tmp_path):
    from edgekv.host.models import load_backbone

    marker = str(tmp_path / "PWNED")
    # an unknown architecture whose config points at code in the folder: refused, nothing run
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil_model.py").write_text(EVIL_PY.format(marker=marker))
    (evil / "config.json").write_text(json.dumps({"model_type": "evilnet", "auto_map": {
        "AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}}))
    with pytest.raises(InputError, match="cannot read its config.json"):
        load_backbone(str(evil))
    # a known architecture with auto_map: transformers' own Llama code is used, the folder's is not
    llama = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("llama"), llama)
    cfg = json.loads((llama / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilModel"}
    (llama / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((llama / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil_model.EvilTokenizer", None]}
    (llama / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (llama / "evil_model.py").write_text(EVIL_PY.format(marker=marker))
    bb = load_backbone(str(llama))
    assert type(bb.model).__name__ == "LlamaForCausalLM"
    assert not os.path.exists(marker)


# --- chat templates ------------------------------------------------------------------------
HOSTILE_TEMPLATES = [
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ messages.append({'role': 'system', 'content': 'x'}) }}",
    "{{ raise_exception.__globals__ }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_chat_template_cannot_reach_python(exported, tmp_path, template):
    from edgekv.runtime.tokenizer import DeviceTokenizer

    marker = tmp_path / "MARKER"
    template = template.replace("MARKER", str(marker))
    tok = DeviceTokenizer.load(os.path.join(exported("llama"), "tokenizer.json"), template)
    try:
        out = tok.render_chat([{"role": "user", "content": "hi"}])
    except CorruptFileError as e:  # the sandbox refused an attribute, and said so
        assert str(e).startswith("the chat template in manifest.json")
    else:  # the refused attribute rendered as undefined (empty), as in Hugging Face's sandbox
        assert re.search(r"<(function|module|class|built-in|bound method|method)", out) is None, out
    assert not marker.exists()


@pytest.mark.parametrize("template, match", [
    ("{% for %}", "does not compile"),
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ 'a' * 10**9 }}", "too long"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
])
def test_broken_or_runaway_templates_are_edgekv_errors(exported, template, match):
    from edgekv.runtime.tokenizer import DeviceTokenizer

    path = os.path.join(exported("llama"), "tokenizer.json")
    with pytest.raises(CorruptFileError, match=match):
        DeviceTokenizer.load(path, template).render_chat([{"role": "user", "content": "hi"}])


def test_template_refusal_is_an_input_error(exported):
    from edgekv.runtime.tokenizer import DeviceTokenizer

    tok = DeviceTokenizer.load(os.path.join(exported("llama"), "tokenizer.json"),
                               "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(InputError, match="refused the conversation: system first"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_hostile_template_through_the_cli_is_exit_4(exported, tmp_path):
    from typer.testing import CliRunner

    from edgekv.cli import app

    art = tmp_path / "art"
    shutil.copytree(exported("llama"), art)
    manifest = json.loads((art / "manifest.json").read_text())
    marker = tmp_path / "MARKER"
    manifest["tokenizer"]["chat_template"] = HOSTILE_TEMPLATES[0].replace("MARKER", str(marker))
    (art / "manifest.json").write_text(json.dumps(manifest))  # the manifest is not itself hashed
    res = CliRunner().invoke(app, ["run", str(art), "--prompt", "hello", "-n", "2"])
    assert res.exit_code == 4, res.output
    assert res.stderr.startswith("edgekv: error: the chat template in manifest.json tried to reach Python")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output
    assert not marker.exists()
