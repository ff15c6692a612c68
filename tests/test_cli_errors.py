"""Bad input at the CLI: one line on stderr (``edgekv: error: ...``), nothing on stdout, the
documented exit code (README table), never a traceback. Through typer's CliRunner.

``edgekv run``: empty prompt (argument, blank, empty stdin), a prompt longer than the
context, ``-k`` larger than the memory, out-of-range options, memory / artifacts paths that
are missing, folders or not edgekv files. ``edgekv adapt``: budgets that cannot be parsed,
are too small for one slot, or are larger than the disk can hold; task data that is missing,
a folder, not UTF-8, malformed or nested too deeply; bad options; a memory whose budget
differs. ``edgekv profile``: a budget too small for one slot. A full disk during an update.
Images: ``--image`` on text-only artifacts, and image files that are missing, folders, empty,
garbage or truncated (the image reader; ``edgekv run --image`` on vision-language artifacts
with a missing or truncated image is in tests/test_multimodal.py).
"""

from __future__ import annotations

import errno
import json
import os
import re

import pytest
from test_mismatch import memory_for
from typer.testing import CliRunner

from edgekv.cli import app
from edgekv.format import Memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runner = CliRunner()


def documented_codes() -> dict[int, str]:
    """The README's exit-code table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return {int(c): m.strip() for c, m in re.findall(r"^\| (\d) \| (.+?) \|$", text, re.M)}


def assert_error(res, code: int, phrase: str) -> None:
    assert code in documented_codes(), f"exit code {code} is not in the README table"
    assert res.exit_code == code, (res.exit_code, res.output)
    assert res.stdout == "", res.stdout
    assert res.stderr.startswith("edgekv: error: ") and res.stderr.count("\n") == 1, res.stderr
    assert phrase in res.stderr, res.stderr
    assert "Traceback" not in res.output


def test_readme_documents_the_error_classes():
    from edgekv.errors import (
        BudgetError,
        CorruptFileError,
        EdgeKVError,
        InputError,
        MismatchError,
        MissingDependencyError,
        SignatureError,
    )

    codes = documented_codes()
    for cls in (EdgeKVError, InputError, CorruptFileError, MismatchError, BudgetError, MissingDependencyError,
                SignatureError):
        assert cls.exit_code in codes, cls


# --- edgekv run --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mem4(exported, tmp_path_factory) -> str:
    return memory_for(exported("llama"), str(tmp_path_factory.mktemp("mem") / "m.ekv"), n=4)


def run(art, *args, memory=None, stdin=None):
    argv = ["run", art, *args] + (["--memory", memory] if memory else [])
    return runner.invoke(app, argv, input=stdin)


@pytest.mark.parametrize("prompt, stdin", [("", None), ("   \n\t", None), ("-", ""), ("-", "  \n")])
def test_empty_prompt(exported, mem4, prompt, stdin):
    assert_error(run(exported("llama"), "--prompt", prompt, memory=mem4, stdin=stdin), 3, "the prompt is empty")


@pytest.mark.parametrize("with_memory", [False, True])
def test_prompt_longer_than_the_context(exported, mem4, with_memory):
    res = run(exported("llama"), "--prompt", "apple " * 600, "-k", "2", memory=mem4 if with_memory else None)
    assert_error(res, 3, "tokens exceeds the model's context of 512; shorten the prompt")


def test_k_larger_than_the_memory(exported, mem4):
    assert_error(run(exported("llama"), "--prompt", "hi", "-k", "9", memory=mem4), 3,
                 "RuntimeConfig.k = 9 is larger than the memory's 4 entries; use 4 or fewer (option -k/--entries)")


@pytest.mark.parametrize("args, phrase", [
    (["-k", "-1"], "RuntimeConfig.k must be >= 0, got -1 (option -k/--entries)"),
    (["-n", "0"], "max_new_tokens must be >= 1"),
    (["--temperature", "-1"], "SamplingConfig.temperature must be >= 0, got -1.0 (option --temperature)"),
    (["--top-p", "0"], "SamplingConfig.top_p must be in (0, 1], got 0.0 (option --top-p)"),
    (["--top-p", "1.5"], "SamplingConfig.top_p must be in (0, 1]"),
    (["--threads", "0"], "RuntimeConfig.threads must be >= 1, got 0 (option --threads/-t)"),
    (["--retrieval", "fast"], "RuntimeConfig.retrieval must be 'exact' or 'hnsw', got 'fast' (option --retrieval)"),
])
def test_out_of_range_run_options(exported, mem4, args, phrase):
    assert_error(run(exported("llama"), "--prompt", "hi", *args, memory=mem4), 3, phrase)


def test_unusable_memory_and_artifacts_paths(exported, tmp_path):
    art = exported("llama")
    (tmp_path / "garbage.ekv").write_bytes(os.urandom(4096))
    (tmp_path / "empty.ekv").write_bytes(b"")
    cases = [
        (run(art, "-p", "hi", memory=str(tmp_path / "missing.ekv")), 3, "memory file not found"),
        (run(art, "-p", "hi", memory=str(tmp_path)), 3, "not a regular file"),
        (run(art, "-p", "hi", memory=str(tmp_path / "garbage.ekv")), 4, "not an edgekv memory file"),
        (run(art, "-p", "hi", memory=str(tmp_path / "empty.ekv")), 4, "file is empty"),
        (run(str(tmp_path / "nope"), "-p", "hi"), 3, "not a folder"),
        (run(str(tmp_path / "garbage.ekv"), "-p", "hi"), 3, "not a folder"),
        (run(str(tmp_path), "-p", "hi"), 3, "not an edgekv export folder"),
    ]
    for res, code, phrase in cases:
        assert_error(res, code, phrase)


def test_image_on_text_only_artifacts_and_unreadable_images(exported, mem4, tmp_path):
    import io

    from PIL import Image

    from edgekv.errors import InputError
    from edgekv.runtime.vision import load_image

    png = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(png, "PNG")
    (tmp_path / "ok.png").write_bytes(png.getvalue())
    assert_error(run(exported("llama"), "--prompt", "hi", "--image", str(tmp_path / "ok.png"), memory=mem4), 3,
                 "holds a text-only model; an image needs a vision-language export")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(os.urandom(2048))
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    for name, phrase in [("missing.png", "not found"), ("", "not found"), ("empty.png", "cannot be read"),
                         ("garbage.png", "cannot be read"), ("truncated.png", "cannot be read")]:
        with pytest.raises(InputError, match=phrase) as e:
            load_image(str(tmp_path / name))
        assert "\n" not in str(e.value)


# --- edgekv adapt ------------------------------------------------------------------------
@pytest.fixture()
def task_file(tmp_path) -> str:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"code for item {i}?", "answer": f"K{i}"}) + "\n"
                            for i in range(4)))
    return str(path)


def adapt(model, data, memory, *args):
    return runner.invoke(app, ["adapt", "--model", model, "--data", data, "--memory", memory, "--no-progress", *args])


@pytest.mark.parametrize("budget", ["lots", "-5MB", "", "5 XB", "1e9", "16MiBs", "0x100"])
def test_budget_that_cannot_be_parsed(tiny_model_dir, task_file, tmp_path, budget):
    res = adapt(tiny_model_dir("llama"), task_file, str(tmp_path / "m.ekv"), "--budget", budget)
    assert_error(res, 3, f"cannot parse size {budget!r}")


@pytest.mark.parametrize("budget, phrase", [
    ("1KiB", "budget 1024 B is too small for one slot: a slot needs"),
    ("0", "budget 0 B is too small for one slot"),
    # the library names the config fields; the CLI adds the options that set them
    ("1KiB", "B with the header (lower EntryConfig.pooled_len, or raise the budget) (option --pooled-len)"),
    ("DISK", "every update writes a second copy beside it"),
    ("100000TiB", "a memory holds at most 4294967295"),
])
def test_budget_too_small_or_too_large(tiny_model_dir, task_file, tmp_path, budget, phrase):
    import shutil

    mem = tmp_path / "m.ekv"
    if budget == "DISK":  # fits the disk once but not twice
        budget = str(shutil.disk_usage(tmp_path).free * 3 // 4)
    assert_error(adapt(tiny_model_dir("llama"), task_file, str(mem), "--budget", budget), 6, phrase)
    assert not mem.exists() and not (tmp_path / "m.ekv.lock").exists()


def test_too_small_hint_suggests_int4_only_when_denser(tiny_model_dir, task_file, tmp_path):
    res = adapt(tiny_model_dir("llama"), task_file, str(tmp_path / "m.ekv"), "--budget", "1KiB", "--payload", "int8")
    assert_error(res, 6, "(lower EntryConfig.pooled_len, use EntryConfig.payload_dtype int4 (the densest), "
                         "or raise the budget)")


def test_profile_budget_too_small_for_one_slot():
    for extra in ([], ["--json"]):
        res = runner.invoke(app, ["profile", "--model", "smollm2-135m", "--budget", "100KiB", "--pooled-len", "64",
                                  "--payload", "int8", *extra])
        assert_error(res, 6, "budget 102400 B is too small for one slot: a slot needs 791936 B with the header")


def test_unreadable_or_bad_task_data(tiny_model_dir, tmp_path):
    model, mem = tiny_model_dir("llama"), str(tmp_path / "m.ekv")
    (tmp_path / "latin1.jsonl").write_bytes('{"id": 1, "prompt": "caf\xe9", "answer": "x"}\n'.encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "p", "answer": "a"}\n{"id": 2, "prompt": 5}\n')
    (tmp_path / "deep.json").write_text("[" * 50_000)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    cases = [
        (str(tmp_path / "missing.jsonl"), "task data file not found"),
        (str(tmp_path), "task data file not found"),
        (str(tmp_path / "latin1.jsonl"), "not UTF-8 text"),
        (str(tmp_path / "bad.jsonl"), "bad.jsonl: line 2: field 'prompt' must be a string, got int"),
        (str(tmp_path / "deep.json"), "not usable JSON (nested too deeply)"),
        (str(tmp_path / "empty.jsonl"), "holds no records"),
    ]
    for data, phrase in cases:
        assert_error(adapt(model, data, mem, "--budget", "1MiB"), 3, phrase)
    assert not os.path.exists(mem)


@pytest.mark.parametrize("args, code, phrase", [
    (["--budget", "1MiB", "--task", "t" * 33], 3, "must be 1 to 32 bytes"),
    (["--budget", "1MiB", "--payload", "int2"], 3,
     "EntryConfig.payload_dtype must be 'int8', 'int4' or 'fp16', got 'int2' (option --payload)"),
    (["--budget", "1MiB", "--pooled-len", "0"], 3, "EntryConfig.pooled_len must be an integer >= 1, got 0 "
                                                    "(option --pooled-len)"),
    (["--budget", "1MiB", "--steps", "-1"], 3, "SelectionConfig.steps must be >= 0, got -1 (option --steps)"),
    (["--budget", "1MiB", "-k", "0"], 3, "AdaptConfig.top_k must be >= 1, got 0 (option -k/--entries)"),
    ([], 3, "does not exist: pass --budget to create it"),
])
def test_bad_adapt_options(tiny_model_dir, task_file, tmp_path, args, code, phrase):
    assert_error(adapt(tiny_model_dir("llama"), task_file, str(tmp_path / "m.ekv"), *args), code, phrase)


def test_bad_model_and_memory_paths(tiny_model_dir, task_file, tmp_path):
    bad = tmp_path / "badmodel"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    assert_error(adapt(str(tmp_path / "nomodel"), task_file, str(tmp_path / "m.ekv"), "--budget", "1MiB"), 3,
                 "not found")
    assert_error(adapt(str(bad), task_file, str(tmp_path / "m.ekv"), "--budget", "1MiB"), 3,
                 "cannot read its config.json")
    assert_error(adapt(tiny_model_dir("llama"), task_file, str(tmp_path), "--budget", "1MiB"), 3,
                 "not a regular file")


def test_adapt_cannot_name_the_task_after_a_generic_path(tiny_model_dir, task_file, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    generic = tmp_path / "data" / "train.jsonl"
    generic.write_text(open(task_file).read())
    mem = tmp_path / "m.ekv"
    assert_error(adapt(tiny_model_dir("llama"), str(generic), str(mem), "--budget", "64KiB"), 3,
                 f"{generic}: the file's name and its folder's are generic (train, test, data, ...), so they do "
                 "not name the task; pass --task NAME")
    monkeypatch.chdir(tmp_path / "data")
    assert_error(adapt(tiny_model_dir("llama"), "train.jsonl", str(mem), "--budget", "64KiB"), 3, "pass --task NAME")
    assert not mem.exists()


def test_adapt_names_a_task_after_its_folder(tiny_model_dir, task_file, tmp_path):
    """tasks/<t>/train.jsonl: each task gets its own name (it was "train" for all, and the second
    replaced the first's anchors)."""
    model, mem = tiny_model_dir("llama"), str(tmp_path / "m.ekv")
    for t in ("shape-code", "receipts"):
        (tmp_path / "tasks" / t).mkdir(parents=True)
        (tmp_path / "tasks" / t / "train.jsonl").write_text(open(task_file).read())
    res = adapt(model, str(tmp_path / "tasks" / "shape-code" / "train.jsonl"), mem, "--budget", "64KiB",
                "--steps", "1", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["task"] == "shape-code"
    with Memory(mem) as m:
        assert m.top_k == 4  # adapt records its k (AdaptConfig.top_k) with the calibration
    res = adapt(model, str(tmp_path / "tasks" / "receipts" / "train.jsonl"), mem, "--steps", "1", "-k", "2",
                "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["task"] == "receipts"
    assert out["anchors"]["count"] > out["anchors"]["this_task"] > 0  # the first task's anchors are kept
    with Memory(mem) as m:
        assert m.top_k == 2  # re-calibrated for the new k


def test_adapt_with_another_budget_and_a_full_disk(tiny_model_dir, task_file, tmp_path, monkeypatch):
    import edgekv.format.writer as fmt_writer  # where commit_update looks _copy_file up

    model, mem = tiny_model_dir("llama"), str(tmp_path / "m.ekv")
    res = adapt(model, task_file, mem, "--budget", "64KiB", "--steps", "1", "--json")
    assert res.exit_code == 0, res.output
    before = open(mem, "rb").read()
    assert_error(adapt(model, task_file, mem, "--budget", "128KiB"), 5, "a memory keeps its budget")

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt_writer, "_copy_file", disk_full)
    assert_error(adapt(model, task_file, mem, "--steps", "1"), 6,
                 "cannot write the update: No space left on device; the memory is unchanged")
    assert open(mem, "rb").read() == before
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []
