"""The CLI core: --version, profile and inspect (table and JSON), errors as one line + exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekv import __version__
from edgekv.budget import BudgetConfig, budget_report
from edgekv.cli import app
from edgekv.format import Entry, MemorySpec, commit_update, create_memory
from edgekv.modelshape import model_shape

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def rows(text: str) -> dict[str, str]:
    """A readable table (``key  value`` lines) as a dict."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition("  ")
        out[key.strip()] = value.strip()
    return out


@pytest.fixture()
def memory(tmp_path) -> str:
    rng = np.random.default_rng(0)
    spec = MemorySpec(2, 2, 8, 4, 16, "e1" * 32)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, 20_000).close()
    shape = spec.payload_shape
    put = {s: Entry.from_float(rng.normal(size=16), rng.normal(size=shape), rng.normal(size=shape),
                               task=t) for s, t in [(0, "vqa"), (1, "vqa"), (3, "captions")]}
    commit_update(path, put=put)
    return path


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout == f"edgekv {__version__}\n"


def test_no_arguments_shows_help():
    res = invoke()
    assert "inspect" in res.output and "profile" in res.output


def test_profile_table_and_json_agree():
    opts = ("--model", "smollm2-135m", "--budget", "16MiB", "--pooled-len", "64", "--payload", "int8")
    res = invoke("profile", *opts)
    assert res.exit_code == 0, res.output
    table = rows(res.stdout)
    data = json.loads(invoke("profile", *opts, "--json").stdout)
    assert data == json.loads(json.dumps(budget_report(model_shape("smollm2-135m"), 16 << 20,
                                                       BudgetConfig(pooled_len=64, payload_dtype="int8"))))
    assert table["model"] == "llama: 30 layers x 3 KV heads x head dim 64"
    assert table["budget"] == "16.00 MiB"
    assert table["payload"] == "int8, m = 64 positions per entry"
    assert table["slot"] == "744.75 KiB" and data["slot_bytes"] == 762_624
    assert table["K payload"] == table["V payload"] == "360.00 KiB"
    assert table["retrieval key"] == "2.25 KiB" and table["scales"] == "22.50 KiB"
    assert table["table entry"] == "64 B"
    assert table["slots that fit"] == str(data["num_slots"]) == "21"
    assert table["memory KV tokens"] == "256 per layer with k = 4"
    # a new memory's payload is int4 when none is asked for: the same report, denser
    default = rows(invoke("profile", *opts[:6]).stdout)
    assert default["payload"] == "int4, m = 64 positions per entry"
    assert int(default["slots that fit"]) > int(table["slots that fit"])


def test_profile_options_and_model_folder(tmp_path):
    cfg = {"model_type": "qwen2", "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
           "hidden_size": 256, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = json.loads(invoke("profile", "--model", str(tmp_path), "--budget", "1000000", "--pooled-len", "8",
                             "--payload", "fp16", "-k", "2", "--json").stdout)
    assert (data["num_layers"], data["num_kv_heads"], data["head_dim"], data["key_dim"]) == (4, 2, 32, 256)
    assert data["payload_bytes_per_slot"] == 2 * 2 * 4 * 2 * 8 * 32
    assert data["slot_bytes"] == -(-(4 * 256 + data["payload_bytes_per_slot"]) // 64) * 64
    assert data["memory_tokens_per_layer"] == 16 and data["payload_dtype"] == "fp16"
    assert data["num_slots"] == (1_000_000 - data["overhead_bytes"]) // (data["slot_bytes"] + 64)


def test_inspect_table(memory):
    res = invoke("inspect", memory)
    assert res.exit_code == 0, res.output
    table = rows(res.stdout)
    assert table["memory"] == memory
    assert table["format version"] == "2"
    assert table["k (calibrated for)"] == "not recorded"  # written without a k
    assert table["shape"] == "2 layers x 2 KV heads x head dim 8"
    assert table["payload"] == "int8"
    n = json.loads(invoke("inspect", memory, "--json").stdout)["num_slots"]
    assert table["slots used"] == f"3 / {n}"
    assert table["generation"] == "1"
    assert table["task vqa"] == "2 entries" and table["task captions"] == "1 entries"
    assert table["file size"].endswith("of budget 19.53 KiB")


ERRORS = [
    (["inspect", "MISSING"], 3, "memory file not found"),
    (["inspect", "DIR"], 3, "not a regular file"),
    (["inspect", "GARBAGE"], 4, "not an edgekv memory file"),
    (["profile", "--model", "no-such-model", "--budget", "1MB"], 3, "model 'no-such-model' not found"),
    (["profile", "--model", "smollm2-135m", "--budget", "1MB", "--payload", "int2"], 3,
     "BudgetConfig.payload_dtype must be int8, int4 or fp16, got 'int2' (option --payload)"),
    (["profile", "--model", "smollm2-135m", "--budget", "1MB", "--pooled-len", "0"], 3,
     "BudgetConfig.pooled_len must be >= 1, got 0 (option --pooled-len)"),
    (["profile", "--model", "smollm2-135m", "--budget", "lots"], 3, "cannot parse size 'lots'"),
    (["profile", "--model", "BADCONFIG", "--budget", "1MB"], 3, "lacks a usable decoder shape"),
]


@pytest.mark.parametrize("args, code, msg", ERRORS)
def test_errors_are_one_line_with_exit_code(tmp_path, args, code, msg):
    (tmp_path / "garbage.ekv").write_bytes(b"\x00" * 4096)
    (tmp_path / "bad.json").write_text('{"model_type": "llama"}')
    subst = {"MISSING": str(tmp_path / "missing.ekv"), "DIR": str(tmp_path),
             "GARBAGE": str(tmp_path / "garbage.ekv"), "BADCONFIG": str(tmp_path / "bad.json")}
    args = [subst.get(a, a) for a in args]
    for extra in ([], ["--json"]):
        res = invoke(*args, *extra)
        assert res.exit_code == code, res.output
        assert res.stdout == ""
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("edgekv: error: ")
        assert msg in res.stderr
        assert "Traceback" not in res.output


@pytest.mark.parametrize("args, hint", [(["inspect"], "Missing argument"), (["profile", "--bogus"], "--bogus"),
                                        (["no-such-command"], "no-such-command")])
def test_usage_errors_are_typers_exit_2(args, hint):
    res = invoke(*args)
    assert res.exit_code == 2
    assert hint in res.output and "Traceback" not in res.output


def test_console_entry_point_errors(tmp_path, memory):
    """The real entry point (``edgekv.cli:main``) in a fresh process: one line, exit code, no traceback."""
    env = dict(os.environ, COLUMNS="120")
    entry = "from edgekv.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", entry, "inspect", str(tmp_path / "x.ekv")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 3
    assert res.stdout == "" and res.stderr == f"edgekv: error: {tmp_path / 'x.ekv'}: memory file not found\n"
    with open(memory, "r+b") as f:
        f.seek(200)
        f.write(b"\xff")
    res = subprocess.run([sys.executable, "-c", entry, "inspect", memory, "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 4 and res.stdout == ""
    assert res.stderr == f"edgekv: error: {memory}: header checksum mismatch (corrupt header)\n"


# --- options that set a config field: help and default written once, in the config ---------------
def _commands():
    """(name, registered callback, click command) of every command, ``stream`` subcommands included."""
    import typer

    from edgekv.commands.stream import stream_app

    root = typer.main.get_command(app)
    for typer_app, group in ((app, root), (stream_app, root.commands["stream"])):
        for info in typer_app.registered_commands:
            name = info.name or info.callback.__name__
            yield name, info.callback, group.commands[name]


def test_config_options_take_help_and_default_from_the_field():
    import dataclasses
    import inspect

    from edgekv.configs import field_default, field_help

    seen = {}
    for name, callback, cmd in _commands():
        defaults = inspect.signature(callback).parameters  # follows guarded's functools.wraps
        mirrored = {}
        for param in cmd.params:
            field = getattr(defaults[param.name].default, "config_field", None)
            if field is None:
                continue
            cls, fname = field
            mirrored[param.name] = cls
            assert param.help == field_help(cls, fname), (name, param.name)
            value = field_default(cls, fname)
            if param.default is None and value is not None:  # left unset unless given: the default is shown
                assert param.show_default == str(value), (name, param.name)
            else:
                assert param.default == value, (name, param.name)
            seen[f"{name} {param.opts[0]}"] = f"{cls.__name__}.{fname}"
        # an option named like a field of a config the command already mirrors must mirror it too
        for param in cmd.params:
            for cls in set(mirrored.values()):
                if param.name in {f.name for f in dataclasses.fields(cls)}:
                    assert param.name in mirrored, f"{name} {param.opts[0]}: take it from {cls.__name__}"
    for cmd_opt in ("adapt --pooled-len", "adapt -k", "bench --seed", "export --quantize-weights", "run -k",
                    "run --temperature", "profile --context", "demo --budget", "write --train"):
        assert cmd_opt in seen, (cmd_opt, sorted(seen))


def test_an_error_naming_a_field_names_its_option(tmp_path):
    res = invoke("profile", "--model", "smollm2-135m", "--budget", "1MB", "-k", "0")
    assert res.exit_code == 3 and "BudgetConfig.top_k must be >= 1" in res.output
    res = invoke("stream", "write", "edge6", "--out", str(tmp_path / "s"), "--val", "0")
    assert res.exit_code == 3 and "SplitSizes.val: 0 must be a positive integer (option --val)" in res.output
