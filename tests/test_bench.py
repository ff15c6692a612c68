"""edgekv bench: metrics against hand-computed matrices, the method registry, budget
matching, batched decoding against the per-query reference, a tiny end-to-end run,
resumability (nothing recomputed), fixed InduceKV footprint, CLI errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from edgekv.bench import metrics
from edgekv.bench.config import BenchConfig
from edgekv.data import Example

NAN = float("nan")

# ---------------------------------------------------------------------------------
# metrics (docs/method.md, "Continual-learning metrics")
# ---------------------------------------------------------------------------------
A3 = np.array([[0.8, 0.1, 0.0],
               [0.6, 0.9, 0.2],
               [0.5, 0.7, 0.95]])


def test_metrics_hand_computed():
    assert metrics.last(A3) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert metrics.avg(A3) == pytest.approx((0.8 + (0.6 + 0.9) / 2 + (0.5 + 0.7 + 0.95) / 3) / 3)
    assert metrics.bwt(A3) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25
    assert metrics.forgetting(A3) == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)  # 0.25


def test_metrics_nan_cells_and_upper_triangle():
    lower = A3.copy()
    lower[np.triu_indices(3, 1)] = NAN  # not evaluated
    assert metrics.avg(lower) == pytest.approx(metrics.avg(A3))
    assert metrics.bwt(lower) == pytest.approx(-0.25)
    # Forgetting's max runs over every t < T, as written: a high A[0][1] (before task 1 was
    # learned) counts
    up = A3.copy()
    up[0, 1] = 0.95
    assert metrics.forgetting(up) == pytest.approx(((0.8 - 0.5) + (0.95 - 0.7)) / 2)
    assert metrics.forgetting(lower) == pytest.approx(0.25)


def test_metrics_single_task_and_bad_shape():
    s = metrics.summary(np.array([[0.4]]))
    assert s == {"avg": pytest.approx(0.4), "last": pytest.approx(0.4), "bwt": None, "forgetting": None}
    with pytest.raises(ValueError, match="square"):
        metrics.avg(np.zeros((2, 3)))
    # improvement: positive BWT, negative forgetting allowed by the definition
    B = np.array([[0.2, 0.0], [0.6, 0.5]])
    assert metrics.bwt(B) == pytest.approx(0.4)
    assert metrics.forgetting(B) == pytest.approx(-0.4)


# ---------------------------------------------------------------------------------
# registry, config, budgets
# ---------------------------------------------------------------------------------
def test_registry_and_parse_methods():
    from edgekv.bench.methods import describe, parse_methods, registry
    from edgekv.errors import InputError

    cfg = BenchConfig()
    names = list(registry(cfg))
    assert names == ["zero-shot", "induce", "induce-random", "induce-nocov", "induce-nocal", "induce-fp16",
                     "induce-int8", "induce-m8", "induce-m32", "induce-uniform", "reservoir", "fifo", "prompt-text",
                     "prompt-text-matched", "lora", "replay-lora"]
    assert all(describe(cfg)[n] for n in names)
    assert parse_methods("lora, induce", cfg) == ["induce", "lora"]  # registry order
    assert parse_methods(None, cfg) == names
    with pytest.raises(InputError, match="unknown method foo: choose from zero-shot, induce"):
        parse_methods("induce,foo", cfg)
    assert list(registry(BenchConfig(short_pooled_len=4)))[7] == "induce-m4"


def test_config_roundtrip_and_validation():
    from edgekv.errors import InputError

    for cfg in (BenchConfig(), BenchConfig().quick()):
        assert BenchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="max_test_per_task"):
        BenchConfig(max_test_per_task=-1)
    assert BenchConfig().max_test_per_task == 0 and BenchConfig().eval_split == "test"  # 0: the whole split
    with pytest.raises(InputError, match="BenchConfig.eval_split must be 'val' or 'test', got 'train'"):
        BenchConfig(eval_split="train")
    assert BenchConfig.from_dict(BenchConfig(eval_split="val").to_dict()).eval_split == "val"
    with pytest.raises(InputError, match="unknown BenchConfig fields: nope"):
        BenchConfig.from_dict({"nope": 1})


def test_plan_sweeps_only_sweep_methods():
    from edgekv.bench.runner import plan

    cfg = BenchConfig(sweep_methods=("induce", "lora"))  # independent of the default sweep
    runs = plan(["zero-shot", "induce", "fifo", "lora"], [100, 300], 200, cfg)
    assert runs == [("zero-shot", 200), ("induce", 100), ("induce", 200), ("induce", 300), ("fifo", 200),
                    ("lora", 100), ("lora", 200), ("lora", 300)]


def test_choose_rank():
    from edgekv.bench.lora import choose_rank

    lin = [("q", 64, 64), ("v", 64, 32)]  # per rank: 128 + 96 = 224 params
    assert choose_rank(lin, 224 * 2 * 5, 2) == 5
    assert choose_rank(lin, 224 * 2 * 5 - 1, 2) == 4
    assert choose_rank(lin, 10**9, 2) == 32  # capped at min(in, out)
    assert choose_rank(lin, 100, 2) == 0


def test_answer_tokens_sets_decode_length(backbone):
    from edgekv.bench.runner import answer_tokens

    tok = backbone("llama").tokenizer
    tasks = tiny_stream()
    longest = max(len(tok(ex.answer, add_special_tokens=False).input_ids) for t in tasks for ex in t.test)
    assert answer_tokens(tok, tasks) == longest >= 1
    assert BenchConfig().max_new_tokens == 0  # auto: the longest answer + 2 (a date needs 10 SmolLM2 tokens)


def test_parse_budgets():
    from edgekv.commands.bench import parse_budgets
    from edgekv.errors import InputError

    assert parse_budgets("1000", None, (0.25, 0.5)) == (1000, [250, 500, 1000])
    assert parse_budgets("1KiB", "2KiB,512", (0.5,)) == (1024, [512, 1024, 2048])
    with pytest.raises(InputError, match="cannot parse size"):
        parse_budgets("lots", None, (0.5,))


def test_balanced_subset_round_robin_over_answers():
    from edgekv.bench.runner import balanced_subset

    exs = [Example(f"e{i}", f"q{i}", a) for i, a in enumerate(["A", "a.", "B", "C", "b", "A", "c", "B"])]
    # concepts by normalised answer: a -> e0, e1, e5; b -> e2, e4, e7; c -> e3, e6
    assert [e.id for e in balanced_subset(exs, 3)] == ["e0", "e2", "e3"]
    assert [e.id for e in balanced_subset(exs, 5)] == ["e0", "e1", "e2", "e3", "e4"]  # split order kept
    assert [e.id for e in balanced_subset(exs, 7)] == ["e0", "e1", "e2", "e3", "e4", "e5", "e6"]  # a gets its 3rd first
    assert balanced_subset(exs, 0) == exs and balanced_subset(exs, 99) == exs


def test_bench_tasks_val_split_and_balanced_caps(tmp_path):
    from edgekv.bench.runner import bench_tasks
    from edgekv.data.stream import load_stream, normalise_answer, write_stream
    from edgekv.errors import InputError

    s = load_stream(os.path.dirname(write_stream("t", str(tmp_path / "s"), order=["count-roman", "home-city"])))
    whole = bench_tasks(s, BenchConfig())
    assert [(len(t.val), len(t.test)) for t in whole] == [(20, 25), (16, 32)]  # the whole balanced splits
    assert [t.test for t in whole] == [tuple(t.test) for t in s.tasks]
    capped = bench_tasks(s, BenchConfig(max_test_per_task=10))
    for t in capped:
        for split in ("val", "test"):
            counts: dict[str, int] = {}
            for ex in t.split(split):
                counts[normalise_answer(ex.answer)] = counts.get(normalise_answer(ex.answer), 0) + 1
            assert len(t.split(split)) == 10 and max(counts.values()) - min(counts.values()) <= 1, (t.name, split)
    assert len({normalise_answer(ex.answer) for ex in capped[0].test}) == 5  # 2 of each count I..V
    with pytest.raises(InputError, match="has no val examples"):
        bench_tasks(tiny_stream(), BenchConfig(eval_split="val"))
    with pytest.raises(InputError, match="eval_split"):
        whole[0].split("train")


# ---------------------------------------------------------------------------------
# decoding: the batched path equals the per-query reference
# ---------------------------------------------------------------------------------
def test_greedy_batch_matches_induction_generate(backbone):
    import torch

    from edgekv.bench.evaluate import greedy_batch
    from edgekv.induce.entries import query_ids
    from edgekv.induce.torch_induction import Bank, Induction

    torch.set_num_threads(1)
    bb = backbone("llama")
    s = bb.shape
    g = torch.Generator().manual_seed(0)
    N, m = 6, 3
    K = torch.randn((N, s.num_layers, s.num_kv_heads, m, s.head_dim), generator=g)
    V = torch.randn((N, s.num_layers, s.num_kv_heads, m, s.head_dim), generator=g)
    P = torch.nn.functional.normalize(torch.randn((N, 8), generator=g), dim=1)
    ind = Induction(bb.model, Bank(np.zeros((N, 8), np.float32), K, V, [str(i) for i in range(N)]), P, 2, bb.rope)
    prompts = ["code for apple?", "a red circle sits left of what", "hi"]
    ids = [query_ids(bb.tokenizer, p) for p in prompts]
    q = torch.nn.functional.normalize(torch.randn((3, 8), generator=g), dim=1)
    gates = [0.9] * s.num_layers
    eos = set(bb.eos_token_ids)
    ref = [ind.generate(q[i], ids[i], 0.1, gates, 6, eos)[0] for i in range(3)]
    _, _, k_mem, v_mem = ind.memory_for(q, None, torch.zeros(N), torch.tensor(0.1),
                                        torch.tensor(gates), leave_one_out=False)
    assert greedy_batch(bb.model, ids, k_mem, v_mem, 6, eos, pad_id=3) == ref
    ref0 = [ind.generate(q[i], ids[i], 0.1, gates, 6, eos, use_memory=False)[0] for i in range(3)]
    assert greedy_batch(bb.model, ids, None, None, 6, eos, pad_id=3) == ref0
    assert all(len(r) == 6 for r in ref)  # a random model never stops early: every step compared


# ---------------------------------------------------------------------------------
# end to end on a tiny random model and a 2-task text stream
# ---------------------------------------------------------------------------------
def tiny_stream():
    from edgekv.bench.runner import BenchTask

    def task(name):
        mk = lambda i, s: Example(f"{name}-{s}{i}", f"code for {name} {i}?", f"K{i}")  # noqa: E731
        return BenchTask(name, tuple(mk(i, "tr") for i in range(8)), tuple(mk(i, "te") for i in range(4)))

    return [task("apple"), task("river")]


METHODS = ["zero-shot", "induce", "reservoir", "prompt-text", "lora"]
BUDGET = 40_000


@pytest.fixture(scope="module")
def bench_run(backbone, tmp_path_factory):
    import torch

    from edgekv.bench.runner import run_bench

    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("bench"))
    bb = backbone("llama")
    res = run_bench(bb, tiny_stream(), METHODS, [BUDGET], BUDGET, out, BenchConfig().quick(), progress=False)
    return bb, out, res


def _run(res, name):
    return next(r for r in res["runs"] if r["method"] == name)


def test_end_to_end_outputs(bench_run):
    bb, out, res = bench_run
    assert [r["method"] for r in res["runs"]] == METHODS
    for r in res["runs"]:
        A = np.array(r["A"], dtype=float)
        low = A[np.tril_indices(2)]
        assert A.shape == (2, 2) and not np.isnan(low).any() and ((low >= 0) & (low <= 1)).all()
        assert bool(np.isnan(A[0, 1])) != BenchConfig().quick().full_matrix  # upper triangle as configured
        for key, fn in (("avg", metrics.avg), ("last", metrics.last), ("bwt", metrics.bwt)):
            assert r["metrics"][key] == pytest.approx(fn(A))
        assert len(r["deployed_bytes"]) == 2 and max(r["deployed_bytes"]) <= BUDGET
    assert _run(res, "zero-shot")["deployed_bytes"] == [0, 0]
    with open(os.path.join(out, "results.json")) as f:
        saved = json.load(f)
    assert saved["runs"][1]["A"] == res["runs"][1]["A"]
    md = open(os.path.join(out, "results.md")).read()
    assert "| induce | 39.06 KiB |" in md and "| lora |" in md
    for r in res["runs"]:
        label = r["method"] if r["budget"] is None else f"{r['method']}_{BUDGET}B"
        assert os.path.getsize(os.path.join(out, "plots", f"heatmap_{label}.png")) > 1000
    t = res["ttft"]
    assert set(t) == {"zero-shot_s", "induce_s", "reservoir_s", "prompt-text_s", "prompt_text_over_induce"}
    assert min(t["zero-shot_s"], t["induce_s"], t["reservoir_s"], t["prompt-text_s"]) > 0
    assert t["prompt_text_over_induce"] == pytest.approx(t["prompt-text_s"] / t["induce_s"])
    assert not os.path.exists(os.path.join(out, "work"))


def test_memory_footprint_fixed_and_matched(bench_run):
    from edgekv.bench.lora import choose_rank, target_linears
    from edgekv.bench.methods import prompt_projection_rows
    from edgekv.induce.adapt import AdaptConfig, memory_spec
    from edgekv.induce.entries import EntryConfig

    bb, out, res = bench_run
    cfg = BenchConfig().quick()
    spec = memory_spec(bb, AdaptConfig(entry=EntryConfig(pooled_len=cfg.pooled_len)))
    expect = spec.file_bytes_for(spec.num_slots_for(BUDGET))
    for name in ("induce", "reservoir"):
        r = _run(res, name)
        assert r["deployed_bytes"] == [expect, expect] and r["bytes_constant"]
        assert sum(r["info"][-1]["per_task_counts"].values()) == r["info"][-1]["num_used"] > 0
        # reservoir is calibrated as InduceKV: tau leaves its initial value, anchors are kept
        assert all(abs(info["tau"] - 0.1) > 1e-4 for info in r["info"]) and r["host_bytes"][-1] > 0
    lin = target_linears(bb.model, cfg.lora_targets)
    rank = choose_rank(lin, BUDGET, 2)
    lora = _run(res, "lora")
    assert lora["info"][-1]["rank"] == rank > 0
    assert lora["deployed_bytes"] == [rank * sum(i + o for _, i, o in lin) * 2] * 2
    pt = _run(res, "prompt-text")
    R = bb.shape.hidden_size
    texts = sum(len(ex.prompt) + len(ex.answer) for t in tiny_stream() for ex in t.train[:12])
    # 16 examples' keys, the projection (its directions' room + mean)
    assert pt["deployed_bytes"][-1] == texts + 16 * 4 * R + 4 * R * (prompt_projection_rows() + 1)


def test_rerun_recomputes_nothing_and_resumes(bench_run):
    from edgekv.bench.runner import run_bench

    bb, out, res = bench_run
    stages = os.path.join(out, "stages")
    files = [os.path.join(d, f) for d, _, fs in os.walk(stages) for f in fs]
    before = {p: os.stat(p).st_mtime_ns for p in files}
    assert any(p.endswith("memory.ekv") for p in files)  # the last stage keeps the method state
    res2 = run_bench(bb, tiny_stream(), METHODS, [BUDGET], BUDGET, out, BenchConfig().quick(), progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in files} == before
    assert [r["A"] for r in res2["runs"]] == [r["A"] for r in res["runs"]]
    # interrupted after task 0: only task 1 is recomputed, from task 0's saved state
    last = os.path.join(stages, "induce", f"{BUDGET}B", "task01", "stage.json")
    first = os.path.join(stages, "induce", f"{BUDGET}B", "task00", "stage.json")
    os.remove(last)
    os.makedirs(os.path.join(stages, "induce", f"{BUDGET}B", "task00", "state"))  # as a crash would leave it
    for p in ("memory.ekv", "memory.ekv.anchors.jsonl"):
        src = os.path.join(stages, "induce", f"{BUDGET}B", "task01", "state", p)
        os.replace(src, os.path.join(stages, "induce", f"{BUDGET}B", "task00", "state", p))
    t_first = os.stat(first).st_mtime_ns
    res3 = run_bench(bb, tiny_stream(), ["induce"], [BUDGET], BUDGET, out, BenchConfig().quick(), progress=False)
    assert os.stat(first).st_mtime_ns == t_first and os.path.exists(last)
    assert res3["runs"][0]["deployed_bytes"] == _run(res, "induce")["deployed_bytes"]
    # a changed config is a different fingerprint: the stage is recomputed
    res4 = run_bench(bb, tiny_stream(), ["zero-shot"], [BUDGET], BUDGET, out,
                     dataclasses.replace(BenchConfig().quick(), max_new_tokens=2),
                     progress=False)
    assert os.stat(os.path.join(stages, "zero-shot", "none", "task00", "stage.json")).st_mtime_ns != \
        before[os.path.join(stages, "zero-shot", "none", "task00", "stage.json")]
    assert not math.isnan(res4["runs"][0]["metrics"]["last"])


def test_stages_record_per_query_correctness_and_intervals(bench_run):
    from edgekv.bench import report
    from edgekv.bench.evaluate import is_correct

    bb, out, res = bench_run
    tasks = tiny_stream()
    for r in res["runs"]:
        for i, row in enumerate(r["correct"]):
            for j, c in enumerate(row):
                if r["A"][i][j] is None:
                    assert c is None
                else:
                    assert len(c) == len(tasks[j].test) and set(c) <= {0, 1}
                    assert np.mean(c) == pytest.approx(r["A"][i][j])
    stage = json.load(open(os.path.join(out, "stages", "induce", f"{BUDGET}B", "task01", "stage.json")))
    for t in tasks:
        expect = [int(is_correct(a, ex.answer)) for a, ex in zip(stage["answers"][t.name], t.test, strict=True)]
        assert stage["correct"][t.name] == expect
    agg = res["aggregate"]
    assert agg["runs"] == ["stream-s0"] and len(agg["methods"]) == len(METHODS)
    for m in agg["methods"]:
        run = _run(res, m["method"])
        assert m["per_run"] == [run["metrics"]]
        for key in ("avg", "last", "bwt"):
            d = m["metrics"][key]
            assert d["mean"] == pytest.approx(run["metrics"][key]) and d["lo"] <= d["mean"] <= d["hi"]
    assert [p["method"] for p in agg["paired"]["methods"]] == [n for n in METHODS if n != "induce"]
    md = report.markdown(res)  # (results.md on disk may come from a later rerun of fewer methods)
    assert "## Intervals over the evaluated queries" in md and "induce minus each method" in md
    assert "| induce | 1 | " in md


# ---------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------
def _cli(args):
    from typer.testing import CliRunner

    from edgekv.cli import app

    return CliRunner().invoke(app, args)


def test_cli_errors(tiny_model_dir, tmp_path):
    from edgekv.data.stream import SplitSizes, write_stream

    r = _cli(["bench", "--model", "x", "--stream", "x", "--budget", "1MiB", "--methods", "induce,nope",
              "--out", str(tmp_path)])
    assert r.exit_code == 3 and "unknown method nope: choose from zero-shot, induce" in r.output
    r = _cli(["bench", "--model", "x", "--stream", "x", "--budget", "lots", "--out", str(tmp_path)])
    assert r.exit_code == 3 and "cannot parse size 'lots'" in r.output
    stream = write_stream("tiny", str(tmp_path / "stream"), order=["glorp-words", "home-city"],
                          sizes=SplitSizes(16, 1, 2))
    r = _cli(["bench", "--model", tiny_model_dir("llama"), "--stream", os.path.dirname(stream), "--budget", "2000",
              "--methods", "induce", "--budgets", "2000", "--out", str(tmp_path / "o"), "--quick", "--no-progress"])
    assert r.exit_code == 6
    assert "budget 2000 B is too small for induce: it needs at least" in r.output
    assert "Traceback" not in r.output


def test_every_method_accepts_image_streams():
    from edgekv.bench.methods import registry

    assert all(cls.supports_images for cls in registry(BenchConfig()).values())


def test_cli_quick_run(tiny_model_dir, tmp_path):
    from edgekv.data.stream import SplitSizes, write_stream

    stream = os.path.dirname(write_stream("tiny", str(tmp_path / "stream"), order=["glorp-words", "home-city"],
                                          sizes=SplitSizes(16, 1, 2)))
    args = ["bench", "--model", tiny_model_dir("llama"), "--stream", stream, "--budget", "40000", "--budgets",
            "40000", "--methods", "fifo,zero-shot", "--out", str(tmp_path / "o"), "--quick", "--no-progress",
            "--threads", "1"]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    with open(tmp_path / "o" / "results.json") as f:
        res = json.load(f)
    assert [x["method"] for x in res["runs"]] == ["zero-shot", "fifo"]
    assert res["stream"]["tasks"] == ["glorp-words", "home-city"]
    assert res["stream"]["test_per_task"] == [6, 6]  # 16 balanced test examples (2 -> 16 concepts), quick: 6
    assert res["runs"][1]["bytes_constant"] and res["command"].startswith("edgekv bench")
    assert "fifo @ 39.06 KiB" in r.output


def test_cli_grid_of_seeds_aggregates_the_runs(tiny_model_dir, tmp_path):
    from edgekv.data.stream import SplitSizes, write_stream

    stream = os.path.dirname(write_stream("tiny", str(tmp_path / "tiny"), order=["glorp-words", "home-city"],
                                          sizes=SplitSizes(16, 1, 2)))
    common = ["bench", "--model", tiny_model_dir("llama"), "--budget", "40000", "--budgets", "40000",
              "--methods", "zero-shot,induce,fifo", "--quick", "--no-progress", "--threads", "1"]
    r = _cli(common + ["--streams", stream, "--seeds", "0,1", "--out", str(tmp_path / "grid")])
    assert r.exit_code == 0, r.output
    grid = tmp_path / "grid"
    assert sorted(os.listdir(grid / "runs")) == ["tiny-s0", "tiny-s1"]
    for label in ("tiny-s0", "tiny-s1"):
        assert (grid / "runs" / label / "results.json").is_file() and (grid / "runs" / label / "stages").is_dir()
    res = json.load(open(grid / "results.json"))
    assert [x["label"] for x in res["runs"]] == ["tiny-s0", "tiny-s1"] and res["seeds"] == [0, 1]
    agg = res["aggregate"]
    assert [(m["method"], m["budget"]) for m in agg["methods"]] == [("zero-shot", None), ("induce", 40000),
                                                                     ("fifo", 40000)]
    for m in agg["methods"]:
        assert m["runs"] == ["tiny-s0", "tiny-s1"] and len(m["per_run"]) == 2
        for key in ("avg", "last", "bwt", "forgetting"):
            d = m["metrics"][key]
            assert set(d) == {"mean", "lo", "hi"} and d["lo"] is not None and d["lo"] <= d["hi"]
            assert d["mean"] == pytest.approx(np.mean([p[key] for p in m["per_run"]]))
    assert [p["method"] for p in agg["paired"]["methods"]] == ["zero-shot", "fifo"]
    assert all(v["verdict"] in ("better", "worse", "cannot tell") for p in agg["paired"]["methods"]
               for v in p["metrics"].values())
    md = (grid / "results.md").read_text()
    assert "### Budget 39.06 KiB (40000 B) (main)" in md and "| induce | 2 | " in md and "## Every run" in md
    # a single run with the same seed gives the same per-run metrics (and is written where it always was)
    r = _cli(common + ["--stream", stream, "--seed", "1", "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    one = json.load(open(tmp_path / "one" / "results.json"))
    for m in agg["methods"]:
        single = next(x for x in one["runs"] if (x["method"], x["budget"]) == (m["method"], m["budget"]))
        assert m["per_run"][1] == single["metrics"]
    # a rerun recomputes no stage
    stages = [os.path.join(d, f) for d, _, fs in os.walk(grid / "runs") for f in fs if f == "stage.json"]
    before = {p: os.stat(p).st_mtime_ns for p in stages}
    r = _cli(common + ["--streams", stream, "--seeds", "0,1", "--out", str(grid)])
    assert r.exit_code == 0 and {p: os.stat(p).st_mtime_ns for p in stages} == before
    r = _cli(common + ["--stream", stream, "--streams", stream, "--out", str(tmp_path / "x")])
    assert r.exit_code == 3 and "not both" in r.output


def test_report_budget_plot_and_markdown(tmp_path):
    from edgekv.bench import report

    def run(method, budget, last):
        A = [[last, None], [last, last]]
        return {"method": method, "budget": budget, "tasks": ["a", "b"], "A": A,
                "metrics": metrics.summary(np.array([[last, NAN], [last, last]])),
                "deployed_bytes": [budget or 0] * 2, "bytes_constant": True, "host_bytes": [0, 0],
                "info": [{}, {"rank": 3}], "seconds": {"learn": 1.0, "evaluate": 2.0}, "ttft_s": None}

    runs = [run("zero-shot", None, 0.0)] + [run("induce", b, x) for b, x in ((1000, 0.2), (2000, 0.4), (4000, 0.5))]
    res = {"model": "m", "stream": {"name": "s", "tasks": ["a", "b"], "test_per_task": [2, 2]}, "main_budget": 4000,
           "runs": runs, "ttft": report.ttft_summary({"induce_s": 0.5}), "command": "edgekv bench", "seconds_total": 1}
    paths = report.write_all(res, str(tmp_path))
    assert os.path.getsize(paths["budget_plot"]) > 1000
    md = open(paths["md"]).read()
    assert "| induce | 3.91 KiB | 50.0 | 50.0 | +0.0 | +0.0 | 4000 | yes | 0 | 1 | 2 | rank 3; TTFT 500 ms |" in md
    assert "| a | 20.0 | - |" in md  # the 1000 B matrix, NaN shown as '-'
    assert res["ttft"]["prompt_text_over_induce"] is None


def test_ablation_switches_in_induce_configs():
    import torch

    from edgekv.induce.calibrate import CalibrationConfig, Phi, calibrate
    from edgekv.induce.select import SelectionConfig, select

    P = torch.nn.functional.normalize(torch.randn((10, 4), generator=torch.Generator().manual_seed(0)), dim=1)

    def no_loss(w, step):
        raise AssertionError("random selection must not evaluate J")

    a = select(4, P, no_loss, SelectionConfig(random=True, seed=3))
    b = select(4, P, no_loss, SelectionConfig(random=True, seed=3))
    expect = np.sort(np.random.default_rng(3).choice(10, size=4, replace=False))
    assert a.keep.tolist() == b.keep.tolist() == expect.tolist()
    assert a.w.tolist() == [1.0 if i in expect else 0.0 for i in range(10)] and a.history == []
    phi = Phi(0.1, [0.9, 0.9])
    before = [p.detach().clone() for p in phi.parameters()]
    assert calibrate(phi, lambda p, rows: (p.tau() + p.gates().sum()), 8, CalibrationConfig(enabled=False)) == []
    assert all(torch.equal(x, y.detach()) for x, y in zip(before, phi.parameters(), strict=True))
    assert len(calibrate(phi, lambda p, rows: (p.tau() + p.gates().sum()), 8, CalibrationConfig(steps=3))) == 3


# ---------------------------------------------------------------------------------
# prompt-text and LoRA on image+text examples (a tiny random LLaVA)
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(backbone with vision inputs, 6 image examples, 2 image queries) on a tiny random LLaVA."""
    import torch
    from PIL import Image
    from tiny_vlms import make_tiny_vlm

    from edgekv.host.models import load_backbone

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench-vlm")
    bb = load_backbone(make_tiny_vlm("llava", str(root / "model")))
    rng = np.random.default_rng(0)
    exs = []
    for i in range(8):
        path = str(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(path)
        exs.append(Example(f"e{i}", f"what shape {i}?", f"ZORP{i % 3}", path))
    return bb, exs[:6], exs[6:]


# ---------------------------------------------------------------------------------
# reservoir / FIFO: the stream policies, and adapt with them as the selector
# ---------------------------------------------------------------------------------
def test_fifo_policy_keeps_the_most_recent_examples():
    from edgekv.bench.methods import offer_stream

    rng = np.random.default_rng(0)
    slots, seen, filled = offer_stream("fifo", [None] * 8, 0, list(range(5)), rng)
    assert slots == [0, 1, 2, 3, 4, None, None, None] and seen == 5 and filled == {0, 1, 2, 3, 4}
    slots, seen, filled = offer_stream("fifo", slots, seen, list(range(5, 25)), rng)  # a second task
    assert sorted(slots) == list(range(17, 25)) and seen == 25 and filled == set(range(8))
    slots, seen, filled = offer_stream("fifo", slots, seen, [25, 26], rng)
    assert sorted(slots) == list(range(19, 27)) and filled == {1, 2}


def test_reservoir_policy_keeps_every_seen_example_with_equal_probability():
    """Algorithm R over two tasks (the count of examples seen carried over): each of the 40
    examples is kept with probability 8/40; 4000 runs put each share within 0.04 of it
    (about 6 standard deviations)."""
    from edgekv.bench.methods import offer_stream

    rng = np.random.default_rng(1)
    counts = np.zeros(40)
    for _ in range(4000):
        slots, seen, _ = offer_stream("reservoir", [None] * 8, 0, list(range(25)), rng)
        slots, seen, filled = offer_stream("reservoir", slots, seen, list(range(25, 40)), rng)
        assert seen == 40 and len(set(slots)) == 8 and all(slots[s] >= 25 for s in filled)
        counts[slots] += 1
    share = counts / 4000
    assert np.abs(share - 0.2).max() < 0.04, share.round(3)
    assert abs(share[:25].mean() - share[25:].mean()) < 0.02  # no preference for either task


def test_stream_rows_map_slots_to_pool_rows():
    from edgekv.bench.methods import stream_rows

    ex = lambda t, i: {"task": t, "example": {"id": i}}  # noqa: E731
    slots = [ex("b", "b1"), ex("a", "a2"), None, ex("b", "b0")]
    old = [("a", "a1"), ("a", "a2")]
    new = [("b", "b0"), ("b", "b1"), ("b", "b2")]
    assert stream_rows(slots, {0, 3}, old, new) == [1, 2, 3]
    with pytest.raises(RuntimeError, match="neither a candidate nor in the memory"):
        stream_rows(slots, {0}, old, new)  # slot 3 claims b0 was in the memory already


@pytest.mark.parametrize("policy", ["fifo", "reservoir"])
def test_stream_memories_are_calibrated_and_resume(backbone, tmp_path, policy):
    import torch

    from edgekv.bench.methods import Fifo, Reservoir
    from edgekv.format import Memory
    from edgekv.induce.adapt import read_anchors

    torch.set_num_threads(1)
    bb = backbone("llama")
    cls = Fifo if policy == "fifo" else Reservoir
    probe = cls(_ctx(bb, tmp_path, 0))
    budget = probe.spec().file_bytes_for(5)
    m = cls(_ctx(bb, tmp_path, budget))
    os.makedirs(m.ctx.work_dir, exist_ok=True)
    tasks = tiny_stream()
    info = m.learn(0, tasks[0].name, tasks[0].train)
    assert info["seen"] == 8 and info["replaced_slots"] == 5
    slots0 = json.loads(json.dumps(m.slots))
    m.save(str(tmp_path / "state0"))
    m.learn(1, tasks[1].name, tasks[1].train)
    with Memory(m.memory_path) as mem:
        kept = sorted(mem.read_entry(int(s)).source_id for s in mem.occupied())
        tau = mem.calibration.tau
    assert abs(tau - m.adapt_config(1).init_tau) > 1e-4  # calibrated, as InduceKV
    assert kept == sorted(item["example"]["id"] for item in m.slots) and m.seen == 16
    if policy == "fifo":  # the 5 most recent examples of the stream
        assert kept == sorted(ex.id for ex in tasks[1].train[-5:])
    assert {t for t, _ in read_anchors(m.memory_path)} == {"apple", "river"}  # L_anc of earlier tasks
    # resumable: task 1 again from the state saved after task 0 gives the same memory
    again = cls(_ctx(bb, tmp_path / "again", budget))
    os.makedirs(again.ctx.work_dir, exist_ok=True)
    again.load(str(tmp_path / "state0"))
    assert (again.seen, again.slots) == (8, slots0)
    again.learn(1, tasks[1].name, tasks[1].train)
    assert (again.seen, again.slots) == (m.seen, m.slots)
    assert open(again.memory_path, "rb").read() == open(m.memory_path, "rb").read()


def _ctx(bb, tmp_path, budget, **cfg):
    from edgekv.bench.base import Context

    return Context(bb, dataclasses.replace(BenchConfig().quick(), max_new_tokens=4, top_k=2, **cfg), budget,
                   str(tmp_path / "work"))


def test_chat_ids_place_several_images_like_query_ids(vlm):
    import torch

    bb, train, _ = vlm
    v, tok = bb.vision, bb.tokenizer
    a, b = train[0], train[1]
    ids, imgs = v.chat_ids(tok, [(a.prompt, a.image, None)])
    assert ids == v.query_ids(tok, a.prompt, a.image) and imgs == [a.image]
    ids, imgs = v.chat_ids(tok, [(a.prompt, a.image, a.answer), ("no image here", None, "x"), (b.prompt, b.image, None)])
    assert imgs == [a.image, b.image]
    n = v.image(a.image)[1].shape[0]  # 25 features per image
    at = [i for i, t in enumerate(ids) if t == v.token_id]
    assert len(at) == 2 * n
    e = v.embed_images(ids, imgs)[0]  # [S, H]
    assert torch.equal(e[at[:n]], v.image(a.image)[1]) and torch.equal(e[at[n:]], v.image(b.image)[1])
    assert not torch.equal(v.image(a.image)[1], v.image(b.image)[1])
    text = tok.decode(ids)
    assert text.index(a.prompt) < text.index(a.answer) < text.index("no image here") < text.index(b.prompt)


def test_prompt_text_on_image_examples(vlm, tmp_path):
    from edgekv.bench.methods import PromptText, prompt_projection_rows
    from edgekv.induce.evaluate import answer_examples

    bb, train, queries = vlm
    m = PromptText(_ctx(bb, tmp_path, 10**6))
    # no stored example yet: the prompt is the query alone, answered exactly like answer_examples
    ref = [a.text for a in answer_examples(bb, queries, max_new_tokens=4)]
    assert m.answer(queries) == ref
    assert m.learn(0, "shapes", train) == {"dropped": 0}
    R = bb.shape.hidden_size
    pngs = sum(os.path.getsize(ex.image) for ex in train)
    rows = prompt_projection_rows()  # the projection's room: phrasing or principal directions
    assert m.deployed_bytes() == 4 * R * (rows + 1) + sum(len(ex.prompt) + len(ex.answer) + 4 * R for ex in train) + pngs
    # a query equal to a stored example retrieves it best (last), with its image
    q = Example("q", train[3].prompt, "?", train[3].image)
    got = m.retrieved([q])[0]
    assert len(got) == 2 and got[-1] == "e3" and got[0] != "e3"
    ids, imgs = m.chat(q)
    shots = {ex.id: ex for ex in train}
    assert imgs == [shots[i].image for i in got] + [q.image]
    text = bb.tokenizer.decode(ids)
    first, best = shots[got[0]], shots[got[1]]
    assert text.index(first.answer) < text.index(best.answer) < text.rindex(q.prompt)
    assert sum(t == bb.vision.token_id for t in ids) == 3 * bb.vision.image(q.image)[1].shape[0]
    answers = m.answer(queries)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    m.first_token()(queries[0])  # the TTFT path runs on an image query
    # text queries on the VLM: the shots keep their images
    t = Example("t", "a text question", "x")
    assert m.chat(t)[1] == [shots[i].image for i in m.retrieved([t])[0]]


def test_prompt_text_matched_counts_the_image_span(vlm, tmp_path):
    """On a VLM a shot's tokens include its image's whole token span: with k x m just below one
    image shot nothing fits; with room for one, the best shot alone is kept, with its image."""
    from edgekv.bench.methods import PromptText, PromptTextMatched

    bb, train, queries = vlm
    pt = PromptText(_ctx(bb, tmp_path / "pt", 10**6))
    pt.learn(0, "shapes", train)
    shots = {ex.id: ex for ex in train}
    q = queries[0]
    best = shots[pt.retrieved([q])[0][-1]]
    mt = PromptTextMatched(_ctx(bb, tmp_path / "mt", 10**6))
    mt.learn(0, "shapes", train)
    span = bb.vision.image(best.image)[1].shape[0]
    need = mt.shot_tokens([best], q)
    assert need > span  # the image's tokens and the turn's text
    for m, kept in (((need - 1) // 2, []), (-(-need // 2), [best.id])):  # limit k x m with k = 2
        mt.ctx.cfg = dataclasses.replace(mt.ctx.cfg, pooled_len=m)
        got = mt.retrieved([q])[0]
        assert got == kept
        if got:
            ids, imgs = mt.chat(q)
            assert imgs == [best.image, q.image]
            assert sum(t == bb.vision.token_id for t in ids) == span + bb.vision.image(q.image)[1].shape[0]


def test_lora_on_image_examples_trains_the_language_model(vlm, tmp_path):
    import torch

    from edgekv.bench.lora import Lora
    from edgekv.induce.evaluate import answer_examples
    from edgekv.induce.torch_induction import answer_nll

    bb, train, _ = vlm
    m = Lora(_ctx(bb, tmp_path, 60_000, lora_epochs=30, lora_lr=0.005, lora_batch_size=3))
    assert m.linears and all(".language_model." in n for n, _, _ in m.linears)  # no vision-tower adapters
    assert m.rank > 0 and m.deployed_bytes() == 0
    encs = m.encode(train)
    assert all(e.image == ex.image for e, ex in zip(encs, train, strict=True))
    with torch.no_grad():
        before = float(m.batch_loss(encs, range(len(train))))
        plain = answer_nll(m._build(), [list(e.ids[: e.answer_end]) for e in encs], [e.answer_start for e in encs],
                           None, None).mean()  # image tokens' own embeddings instead of the features
    assert abs(float(plain) - before) > 1e-3  # the features are spliced in
    info = m.learn(0, "shapes", train)
    with torch.no_grad():
        after = float(m.batch_loss(encs, range(len(train))))
    assert after < before - 0.5 and info["loss_last"] < info["loss_first"]
    assert m.deployed_bytes() == m.rank * sum(i + o for _, i, o in m.linears) * 2 <= 60_000
    # answer_examples with the adapted model in the backbone's place uses the adapters ...
    base = [a.token_ids for a in answer_examples(bb, train, max_new_tokens=4)]
    adapted = [a.token_ids for a in answer_examples(m.adapted(), train, max_new_tokens=4)]
    assert adapted != base
    assert m.answer(train) == [bb.tokenizer.decode(t, skip_special_tokens=True).strip() for t in adapted]
    with m._peft.disable_adapter():  # ... and only them: switched off, the base answers come back
        assert [a.token_ids for a in answer_examples(m.adapted(), train, max_new_tokens=4)] == base
