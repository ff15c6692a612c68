"""`edgekv demo` end to end on a tiny random LLaVA and a small copy of the default stream.

The real demo (tiny-vlm, edge6) runs in `make demo`; here every step runs for real on tiny
models: stream -> export -> zero-shot runtime -> adapt task after task -> runtime with memory
-> table. What is checked: the memory file never changes size, the accuracy matrix is
lower-triangular and agrees with the runtime answering the same queries, and the table says so.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_vlms import make_tiny_vlm

from edgekv.data.stream import SplitSizes, write_stream


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from edgekv.demo import DemoConfig, run_demo

    root = tmp_path_factory.mktemp("demo")
    model = make_tiny_vlm("llava", str(root / "llava"))
    stream = write_stream("edge6", str(root / "stream"), seed=0, order=["shape-code", "glorp-words", "count-roman"],
                          sizes=SplitSizes(16, 1, 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines: list[str] = []
    try:
        cfg = DemoConfig(model=model, stream=os.path.dirname(stream), budget="64KiB", num_test=2, top_k=2,
                         max_new_tokens=3, selection_steps=1, work_dir=str(root / "work"), threads=1)
        res = run_demo(cfg, say=lines.append)
    finally:
        torch.set_num_threads(threads)
    return res, lines, cfg


def test_demo_keeps_the_footprint_and_fills_a_lower_triangular_matrix(demo_run):
    res, lines, _ = demo_run
    n = len(res.tasks)
    assert n == 3 and [t["name"] for t in res.tasks] == ["shape-code", "glorp-words", "count-roman"]
    assert len(set(res.file_bytes)) == 1 and res.file_bytes[0] == os.path.getsize(res.memory)
    assert res.file_bytes[0] == res.budget["file_bytes"] <= 64 * 1024
    for i, row in enumerate(res.matrix):
        assert all(x is not None and 0 <= x <= 1 for x in row[: i + 1])
        assert all(x is None for x in row[i + 1:])
    assert [t["final"] for t in res.tasks] == res.matrix[-1]
    assert [t["just_learned"] for t in res.tasks] == [res.matrix[i][i] for i in range(n)]
    assert any(line.startswith("[4/5]") for line in lines) and any(line.startswith("[5/5]") for line in lines)


def test_demo_accuracy_is_the_runtime_answering_the_held_out_queries(demo_run):
    from edgekv.data.stream import is_correct, load_stream
    from edgekv.runtime import Runtime

    res, _, cfg = demo_run
    stream = load_stream(cfg.stream)
    with Runtime.load(res.artifacts, memory=res.memory, k=cfg.top_k, threads=1) as rt:
        for t, task in zip(res.tasks, stream.tasks, strict=True):
            qs = task.test[: cfg.num_test]
            right = sum(is_correct(rt.generate(q.prompt, max_new_tokens=cfg.max_new_tokens, image=q.image).text, q.answer)
                        for q in qs)
            assert t["final"] == pytest.approx(right / len(qs))


def test_demo_table_and_json(demo_run):
    from edgekv.demo import render

    res, _, _ = demo_run
    text = render(res)
    assert "identical after every task" in text and "Budget breakdown" in text
    for t in res.tasks:
        assert t["name"] in text
    json.dumps(res.to_dict())  # the --json output is serialisable


def test_builtin_conversion_prints_no_library_noise(tmp_path):
    """The one-time GGUF conversion (the demo's first step on a fresh machine) prints neither
    transformers' tokenizer "legacy behaviour" warning nor its conversion progress bar."""
    import subprocess
    import sys

    code = ("from edgekv.host.models import _builtin_folder, load_backbone; _builtin_folder('smollm2-135m'); "
            "load_backbone('smollm2-135m')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "EDGEKV_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "legacy" not in res.stderr and "Converting" not in res.stderr and "%|" not in res.stderr, res.stderr[-2000:]
    assert any((tmp_path / "models").iterdir())  # it did convert
