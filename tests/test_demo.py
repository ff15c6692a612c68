"""`edgekv demo` end to end on a tiny random LLaVA and a small copy of the default stream.

The real demo (tiny-vlm, edge6) runs in `make demo`; here every step runs for real on tiny
models: stream -> export -> zero-shot runtime -> adapt task after task -> runtime with memory
-> prompt text (retrieved train examples as chat turns) on the device -> table. What is
checked: the memory file never changes size, the accuracy matrix is lower-triangular and
agrees with the runtime answering the same queries, the prompt-text accuracy is its device
answers scored the same way, the two times to first token are measured, and the table says so.
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
                         max_new_tokens=3, selection_steps=1, work_dir=str(root / "work"), threads=1,
                         prompt_num_test=1, ttft_queries=4)
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
    assert all(any(line.startswith(f"[{i}/6]") for line in lines) for i in range(1, 7))


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


def test_demo_prompt_text_is_measured_on_the_device(demo_run):
    """Prompt text after the last task: accuracy from the device's generated answers (scored as
    InduceKV's), both TTFTs measured, the store's bytes (growing) beside the fixed memory file."""
    from types import SimpleNamespace

    from edgekv.bench.device import MethodState, close_methods, open_methods
    from edgekv.bench.methods import PromptText, prompt_keys
    from edgekv.data.stream import is_correct, load_stream
    from edgekv.host.models import load_backbone

    res, _, cfg = demo_run
    pt = res.prompt_text
    stream = load_stream(cfg.stream)
    store = [ex for t in stream.tasks for ex in t.train]
    assert pt["examples"] == len(store) == 48 and pt["top_k"] == cfg.top_k
    assert pt["num_test"] == [1, 1, 1] and all(t["prompt_num_test"] == 1 for t in res.tasks)
    # the accuracy is the device's answers, scored as the demo scores InduceKV's
    bb = load_backbone(cfg.model)
    state = MethodState("prompt", items=tuple(store), keys=prompt_keys(bb, store))
    base, methods = open_methods(res.artifacts, {"p": state}, SimpleNamespace(top_k=cfg.top_k), threads=1)
    try:
        for t, task in zip(res.tasks, stream.tasks, strict=True):
            q = task.test[0]
            out = methods["p"].generate(q, cfg.max_new_tokens)
            assert out.token_ids and len(methods["p"].last_rows) == cfg.top_k  # k shots, a real answer
            assert 0 <= t["prompt_text"] <= 1 and t["prompt_text"] == float(is_correct(out.text, q.answer))
    finally:
        close_methods(base, methods)
    # InduceKV's after-all on the same queries: the first query's mark of the last row
    assert all(t["final_on_prompt_queries"] in (0.0, 1.0) for t in res.tasks)
    tt = pt["ttft"]
    # 4 held-out queries, each task's in turn: shape-code, glorp-words, count-roman, shape-code
    assert tt["queries"] == cfg.ttft_queries == 4 == len(tt["induce_calls_ms"]) == len(tt["prompt_text_calls_ms"])
    assert tt["image_queries"] == 3 and tt["induce_ms"] > 0 and tt["prompt_text_ms"] > 0
    assert tt["ratio"] == pytest.approx(tt["prompt_text_ms"] / tt["induce_ms"])
    assert tt["prompt_text"]["shots"] == cfg.top_k and tt["prompt_text"]["prompt_tokens"] > tt["induce"]["prompt_tokens"]
    assert tt["induce"]["memory_tokens"] > 0
    sb = pt["store_bytes"]
    assert len(sb) == 3 and 0 < sb[0] < sb[1] < sb[2] and pt["store_image_bytes"] > 0
    assert sb[-1] == PromptText.store_bytes(store, bb.shape.hidden_size) > pt["store_image_bytes"]
    assert pt["memory_bytes"] == res.file_bytes[-1]
    assert res.seconds["prompt_text"] > 0 and set(pt["seconds"]) == {"keys", "load", "answers", "ttft"}


def test_demo_table_and_json(demo_run):
    from dataclasses import replace

    from edgekv.demo import render

    res, _, _ = demo_run
    text = render(res)
    assert "identical after every task" in text and "Budget breakdown" in text
    for t in res.tasks:
        assert t["name"] in text
    pt, tt = res.prompt_text, res.prompt_text["ttft"]
    assert "prompt text" in text and "after all, same queries" in text and "first 1 held-out queries" in text.replace("\n", " ")
    assert f"median over {tt['queries']} queries" in text
    assert f"InduceKV {tt['induce_ms']:,.0f} ms, prompt text {tt['prompt_text_ms']:,.0f} ms ({tt['ratio']:.1f} x)" in text
    assert f"{pt['memory_bytes']:,} B, fixed" in text and f"{pt['store_bytes'][-1]:,} B" in text
    assert all(f"{b:,} B" in text for b in pt["store_bytes"])
    # every held-out query answered with prompt text: no subset columns
    full = replace(res, tasks=[{**t, "prompt_num_test": t["num_test"]} for t in res.tasks])
    assert "after all, same queries" not in render(full) and "prompt text" in render(full)
    assert "prompt text" not in render(replace(res, prompt_text={}))  # a result without the step still renders
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
