"""edgekv bench's fair baselines and the wiring around the runs: the uniform-alpha ablation
(induce-uniform), prompt text at matched context (prompt-text-matched), LoRA tuned on val,
the budget sweep on the first run of a grid, and --ladder / --device-ttft / the summary plots
on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from edgekv.bench.config import BenchConfig
from edgekv.data import Example


def _tiny_tasks(with_val: bool = False):
    from edgekv.bench.runner import BenchTask

    def task(name):
        mk = lambda i, s: Example(f"{name}-{s}{i}", f"code for {name} {i}?", f"K{i}")  # noqa: E731
        return BenchTask(name, tuple(mk(i, "tr") for i in range(8)), tuple(mk(i, "te") for i in range(4)),
                         tuple(mk(i, "va") for i in range(4)) if with_val else ())

    return [task("apple"), task("river")]


def _cli(args):
    from typer.testing import CliRunner

    from edgekv.cli import app

    return CliRunner().invoke(app, args)


# ---------------------------------------------------------------------------------
# induce-uniform: alpha = 1/k, tau fixed through calibration and the memory file
# ---------------------------------------------------------------------------------
def test_uniform_tau_gives_uniform_alpha_through_the_file(tmp_path):
    from edgekv.bench.methods import UNIFORM_TAU
    from edgekv.format import Calibration, Memory, MemorySpec, create_memory
    from edgekv.retrieval import retrieval_weights

    spec = MemorySpec(2, 1, 4, 2, 8, "0" * 64, "int8", None)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(3), Calibration(UNIFORM_TAU, (0.9, 0.9))).close()
    with Memory(path) as mem:
        tau = mem.calibration.tau
    assert tau == UNIFORM_TAU  # exact in the header's float32
    rng = np.random.default_rng(0)
    for k in (1, 2, 4, 8, 16):
        for sims in (rng.uniform(-1, 1, k), np.array([1.0] + [-1.0] * (k - 1))):
            a = retrieval_weights(sims.astype(np.float32), tau)
            assert np.abs(a - 1.0 / k).max() < 1e-6, k
    assert np.abs(retrieval_weights(np.array([1.0, -1.0], np.float32), 0.1) - 0.5).max() > 0.4  # InduceKV's tau is not


def test_fit_tau_false_keeps_tau_and_fits_gates():
    from edgekv.bench.methods import UNIFORM_TAU
    from edgekv.format import Calibration
    from edgekv.induce.calibrate import CalibrationConfig, Phi, calibrate

    cfg = CalibrationConfig(steps=3, fit_tau=False)
    phi = Phi.from_calibration(Calibration(UNIFORM_TAU, (0.9, 0.9)), cfg)
    assert phi.calibration().tau == UNIFORM_TAU
    gates = phi.gates().detach().clone()
    assert len(calibrate(phi, lambda p, rows: p.tau() + p.gates().sum(), 8, cfg)) == 3
    assert phi.calibration().tau == UNIFORM_TAU and not np.allclose(phi.gates().detach(), gates)
    free = Phi(0.1, [0.9, 0.9])
    calibrate(free, lambda p, rows: p.tau() + p.gates().sum(), 8, CalibrationConfig(steps=3))
    assert free.calibration().tau < 0.1  # fitted by default
    assert CalibrationConfig().fit_tau and CalibrationConfig.from_dict(cfg.to_dict()) == cfg


def test_induce_uniform_stores_the_uniform_tau(backbone, tmp_path):
    import torch

    from edgekv.bench.base import Context
    from edgekv.bench.methods import UNIFORM_TAU, Induce, InduceUniform

    torch.set_num_threads(1)
    ctx = Context(backbone("llama"), BenchConfig().quick(), 40_000, str(tmp_path / "work"))
    m = InduceUniform(ctx)
    acfg = m.adapt_config(0)
    assert acfg.init_tau == UNIFORM_TAU and not acfg.calibration.fit_tau and acfg.calibration.enabled
    assert acfg.selection == Induce(ctx).adapt_config(0).selection  # everything else as InduceKV
    m.learn(0, "apple", _tiny_tasks()[0].train)
    assert m.info()["tau"] == UNIFORM_TAU and m.params()["uniform_alpha"]


def test_stage_fingerprint_follows_the_adapt_defaults(backbone, tmp_path, monkeypatch):
    """A changed library default of adapt (init_tau) recomputes a KV memory's stages, not LoRA's."""
    from edgekv.bench import runner
    from edgekv.bench.base import Context
    from edgekv.bench.lora import Lora
    from edgekv.bench.methods import Induce, Reservoir

    ctx = Context(backbone("llama"), BenchConfig().quick(), 40_000, str(tmp_path / "work"))
    cfg = ctx.cfg
    methods = [Induce(ctx), Reservoir(ctx), Lora(ctx)]
    before = [runner.stage_fingerprint(cfg, m, 40_000, "s", "m", 1) for m in methods]
    for m in methods[:2]:
        orig = type(m).adapt_config
        monkeypatch.setattr(type(m), "adapt_config",
                            lambda self, i, orig=orig: dataclasses.replace(orig(self, i), init_tau=0.37))
    after = [runner.stage_fingerprint(cfg, m, 40_000, "s", "m", 1) for m in methods]
    assert before[0] != after[0] and before[1] != after[1] and before[2] == after[2]
    assert before[0] != runner.stage_fingerprint(cfg, methods[0], 40_000, "s", "m", 2)  # per task (its seed)


# ---------------------------------------------------------------------------------
# prompt-text-matched: a best-first prefix of prompt-text's shots within k x m tokens
# ---------------------------------------------------------------------------------
def test_prompt_text_matched_is_a_prefix_within_k_times_m(backbone, tmp_path):
    from edgekv.bench.base import Context
    from edgekv.bench.methods import PromptText, PromptTextMatched

    bb = backbone("llama")
    cfg = dataclasses.replace(BenchConfig().quick(), top_k=3)
    pt = PromptText(Context(bb, cfg, 1 << 20, str(tmp_path / "pt")))
    mt = PromptTextMatched(Context(bb, cfg, 1 << 20, str(tmp_path / "mt")))
    train = [ex for t in _tiny_tasks() for ex in t.train]
    for m in (pt, mt):
        m.learn(0, "t", train)
    queries = [ex for t in _tiny_tasks() for ex in t.test]
    full = pt.retrieved(queries)
    one = mt.shot_tokens([train[0]], queries[0])
    seen = set()
    for m_len in (1, one // 3 + 1, (2 * one) // 3 + 1, one + 1, 10 * one):
        mt.ctx.cfg = dataclasses.replace(cfg, pooled_len=max(1, m_len))
        limit = 3 * mt.ctx.cfg.pooled_len
        assert mt.params() == {**pt.params(), "shot_tokens": limit}
        for q, got, ref in zip(queries, mt.retrieved(queries), full, strict=True):
            assert got == ref[len(ref) - len(got):]  # best last: a best-first prefix of prompt-text's shots
            shots = [next(e for _, e in mt.items if e.id == i) for i in got]
            assert mt.shot_tokens(shots, q) <= limit
            ids = mt.prompt_ids([q])[0]
            assert len(ids) - len(mt.text_ids([], q)) == mt.shot_tokens(shots, q)  # what is prefilled
            if len(got) < len(ref):  # the next shot did not fit
                nxt = next(e for _, e in mt.items if e.id == ref[len(ref) - len(got) - 1])
                assert mt.shot_tokens([nxt] + shots, q) > limit
            seen.add(len(got))
    assert {0, 3} <= seen and seen & {1, 2}  # none, some, all of the k shots across the limits


def test_prompt_text_matched_state_on_the_device(tmp_path):
    from edgekv.bench.device import method_states_from_bench
    from edgekv.bench.runner import stage_dir

    cfg = BenchConfig(top_k=3, pooled_len=5)
    for name in ("prompt-text", "prompt-text-matched"):
        state = os.path.join(stage_dir(str(tmp_path), name, 4096, 1), "state")
        os.makedirs(state)
        with open(os.path.join(state, "state.json"), "w") as f:
            json.dump({"items": [["t", Example("e0", "p", "a").__dict__]]}, f)
        np.save(os.path.join(state, "keys.npy"), np.ones((1, 8), np.float32))
    got = method_states_from_bench(str(tmp_path), ["prompt-text", "prompt-text-matched"], 4096, 2, cfg)
    assert got["prompt-text"].shot_tokens is None and got["prompt-text-matched"].shot_tokens == 15


def test_prompt_text_matched_device_shots_equal_the_host(backbone, exported, tmp_path):
    """The device keeps the same best-first prefix and prefills the same ids as the host method."""
    from edgekv.bench.base import Context
    from edgekv.bench.device import close_methods, open_methods, read_prompt_state
    from edgekv.bench.methods import PromptTextMatched

    train = [ex for t in _tiny_tasks() for ex in t.train]
    probe = PromptTextMatched(Context(backbone("llama"), BenchConfig(top_k=3), 1 << 20, str(tmp_path / "probe")))
    one = probe.shot_tokens([train[0]], train[1])
    cfg = BenchConfig(top_k=3, pooled_len=max(1, (2 * one) // 3))  # room for about two shots of three
    mt = PromptTextMatched(Context(backbone("llama"), cfg, 1 << 20, str(tmp_path / "work")))
    mt.learn(0, "t", train)
    mt.save(str(tmp_path / "state"))
    st = dataclasses.replace(read_prompt_state(str(tmp_path / "state")), shot_tokens=mt.shot_token_limit(cfg))
    base, methods = open_methods(exported("llama"), {"prompt-text-matched": st}, cfg, threads=1)
    try:
        t = methods["prompt-text-matched"]
        queries = [ex for task in _tiny_tasks() for ex in task.test]
        for q, want in zip(queries, mt.retrieved(queries), strict=True):
            ids, _, _, rows = t.build(q)
            assert [t.items[r].id for r in rows] == want and 0 < len(want) < 3
            assert ids == mt.prompt_ids([q])[0]
    finally:
        close_methods(base, methods)


# ---------------------------------------------------------------------------------
# LoRA tuned on val; the sweep on the first run of a grid
# ---------------------------------------------------------------------------------
def test_pick_best_rule():
    from edgekv.bench.grid import pick_best, tuning_grid

    def p(lr, ep, last, avg):
        return {"lora_lr": lr, "lora_epochs": ep, "metrics": {"last": last, "avg": avg}}

    assert tuning_grid(BenchConfig()) == [{"lora_lr": lr, "lora_epochs": ep} for ep in (2, 6)
                                          for lr in (3e-4, 1e-3, 3e-3)]
    assert pick_best([p(1, 2, 0.2, 0.9), p(2, 2, 0.5, 0.1), p(3, 6, None, None)])["lora_lr"] == 2  # Last first
    assert pick_best([p(1, 2, 0.5, 0.1), p(2, 6, 0.5, 0.3)])["lora_lr"] == 2  # then Avg
    assert pick_best([p(1, 6, 0.5, 0.3), p(2, 2, 0.5, 0.3), p(3, 2, 0.5, 0.3)])["lora_lr"] == 2  # then cheaper, first


def test_tuning_picks_the_best_point_and_the_test_runs_use_it(backbone, tmp_path, monkeypatch):
    import torch

    from edgekv.bench import grid, runner
    from edgekv.bench.base import Context
    from edgekv.bench.lora import Lora

    torch.set_num_threads(1)
    real = runner.run_bench
    calls = []

    def fake_val(*a, **k):  # the val runs are real; their Last is made to favour lr 3e-3, 1 epoch
        res = real(*a, **k)
        cfg = a[6]
        calls.append((cfg.eval_split, cfg.lora_lr, cfg.lora_epochs, k.get("overrides")))
        if cfg.eval_split == "val":
            res["runs"][0]["metrics"]["last"] = 0.5 if (cfg.lora_lr, cfg.lora_epochs) == (3e-3, 1) else 0.25
        return res

    monkeypatch.setattr(grid, "run_bench", fake_val)
    bb = backbone("llama")
    cfg = dataclasses.replace(BenchConfig().quick(), tune=("lora",), tune_lora_lrs=(1e-3, 3e-3),
                              tune_lora_epochs=(1, 2), device_ttft=False)
    out = str(tmp_path / "o")
    res = grid.run_single(bb, _tiny_tasks(with_val=True), ["zero-shot", "lora"], [40_000], 40_000, out, cfg,
                          progress=False)
    assert [c[:3] for c in calls if c[0] == "val"] == [("val", 1e-3, 1), ("val", 3e-3, 1), ("val", 1e-3, 2),
                                                      ("val", 3e-3, 2)]
    assert calls[-1][3] == {"lora": {"lora_lr": 3e-3, "lora_epochs": 1}}  # the test run gets the choice
    saved = json.load(open(os.path.join(out, "tuning.json")))
    assert saved == res["tuning"] and saved["methods"]["lora"]["chosen"] == {"lora_lr": 3e-3, "lora_epochs": 1}
    assert [p["dir"] for p in saved["methods"]["lora"]["grid"]] == [
        os.path.join("tuning", "lora", d) for d in ("0.001-1", "0.003-1", "0.001-2", "0.003-2")]
    assert os.path.isfile(os.path.join(out, "tuning", "lora", "0.003-1", "results.json"))
    # the chosen values are in the test stages' fingerprint
    stage = json.load(open(os.path.join(runner.stage_dir(out, "lora", 40_000, 1), "stage.json")))
    res_cfg = BenchConfig.from_dict(res["config"])  # as the run resolved it (max_new_tokens)
    tuned = dataclasses.replace(res_cfg, lora_lr=3e-3, lora_epochs=1)
    lora = Lora(Context(bb, tuned, 40_000, str(tmp_path / "w")))
    sfp = res["stream"]["fingerprint"]
    assert stage["fingerprint"] == runner.stage_fingerprint(tuned, lora, 40_000, sfp, bb.fingerprint, 1)
    assert stage["fingerprint"] != runner.stage_fingerprint(res_cfg, lora, 40_000, sfp, bb.fingerprint, 1)
    assert stage["info"]["lr"] == 3e-3 and stage["info"]["epochs"] == 1
    assert "## Tuning on val" in open(os.path.join(out, "results.md")).read()
    # a rerun recomputes nothing (every grid point and test stage resumes)
    stages = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f == "stage.json"]
    before = {p: os.stat(p).st_mtime_ns for p in stages}
    grid.run_single(bb, _tiny_tasks(with_val=True), ["zero-shot", "lora"], [40_000], 40_000, out, cfg, progress=False)
    assert {p: os.stat(p).st_mtime_ns for p in stages} == before


def test_grid_sweeps_on_the_first_run_only(backbone, tmp_path):
    import torch

    from edgekv.bench.grid import run_grid

    torch.set_num_threads(1)
    assert {"induce", "reservoir", "fifo", "lora", "replay-lora"} == set(BenchConfig().sweep_methods)
    cfg = dataclasses.replace(BenchConfig().quick(), device_ttft=False)
    res = run_grid(backbone("llama"), ["tiny"], [0, 1], ["zero-shot", "lora"], [20_000, 40_000], 40_000,
                   str(tmp_path), cfg, progress=False, load=lambda s, seed: _tiny_tasks())
    methods = {(m["method"], m["budget"]): m["runs"] for m in res["aggregate"]["methods"]}
    assert methods == {("zero-shot", None): ["tiny-s0", "tiny-s1"], ("lora", 20_000): ["tiny-s0"],
                       ("lora", 40_000): ["tiny-s0", "tiny-s1"]}
    assert res["sweep_run"] == "tiny-s0" and os.path.isfile(tmp_path / "plots" / "last_vs_bytes.png")


def test_tune_errors(tiny_model_dir, tmp_path):
    from edgekv.errors import InputError

    with pytest.raises(InputError, match="cannot tune induce: choose from lora, replay-lora"):
        BenchConfig(tune=("induce",))
    with pytest.raises(InputError, match="tune_lora_epochs"):
        BenchConfig(tune_lora_epochs=(0,))
    r = _cli(["bench", "--model", "x", "--stream", "x", "--budget", "1MiB", "--methods", "induce",
              "--tune", "lora", "--out", str(tmp_path)])
    assert r.exit_code == 3 and "tune only methods that run" in r.output


# ---------------------------------------------------------------------------------
# --ladder, --device-ttft and the summary plots, end to end
# ---------------------------------------------------------------------------------
def test_cli_ladder_device_ttft_and_plots(tiny_model_dir, tmp_path):
    from edgekv.data.stream import SplitSizes, write_stream

    stream = os.path.dirname(write_stream("tiny", str(tmp_path / "stream"), order=["glorp-words", "home-city"],
                                          sizes=SplitSizes(16, 1, 2)))
    out = tmp_path / "o"
    args = ["bench", "--model", tiny_model_dir("llama"), "--stream", stream, "--budget", "40000", "--budgets",
            "40000", "--methods", "zero-shot,induce,prompt-text-matched", "--out", str(out), "--quick",
            "--no-progress", "--threads", "1", "--ladder", "--device-ttft"]
    r = _cli(args)
    assert r.exit_code == 0, r.output
    for name in ("ladder.json", "ladder.md", "ladder.png"):
        assert os.path.getsize(out / "ladder" / name) > 100
    res = json.load(open(out / "results.json"))
    lad = json.load(open(out / "ladder" / "ladder.json"))
    assert lad["rungs"][-1] == "memory" and lad["memory"] == os.path.join("stages", "induce", "40000B", "task01",
                                                                         "state", "memory.ekv")
    assert res["ladder"]["fingerprint"] == lad["fingerprint"] and res["ladder"]["all"] == lad["all"]
    dev = res["ttft_device"]
    assert set(dev["methods"]) == {"zero-shot", "induce", "prompt-text-matched"}
    for name, d in dev["methods"].items():
        assert d["median_ms"] > 0 and d["p25_ms"] <= d["median_ms"] <= d["p75_ms"], name
    assert dev["methods"]["induce"]["memory_tokens"] == 4 * 4 and dev["reference"] == "induce"  # k x m (quick)
    assert dev["methods"]["prompt-text-matched"]["prompt_tokens"] <= dev["methods"]["zero-shot"]["prompt_tokens"] + 16
    assert dev["artifacts"] == "artifacts" and res["ttft"]["induce_s"] > 0  # the host figure is kept
    md = (out / "results.md").read_text()
    assert "## Time to first token on the device runtime" in md and "| induce | memory |" in md
    assert "## Accuracy ladder (first run)" in md
    for name in ("last_vs_bytes.png", "last_vs_ttft.png"):
        assert os.path.getsize(out / "plots" / name) > 1000
    assert res["outputs"]["last_vs_ttft"] == os.path.join("plots", "last_vs_ttft.png")
    assert "device TTFT induce" in r.output and "--ladder --device-ttft" in res["command"]
    # a rerun reuses the ladder (same fingerprint) and the export
    t_ladder = os.stat(out / "ladder" / "ladder.json").st_mtime_ns
    t_art = os.stat(out / "artifacts" / "manifest.json").st_mtime_ns
    assert _cli(args).exit_code == 0
    assert os.stat(out / "ladder" / "ladder.json").st_mtime_ns == t_ladder
    assert os.stat(out / "artifacts" / "manifest.json").st_mtime_ns == t_art
    # --quick leaves the device TTFT off unless asked for
    quick = args[:10] + ["zero-shot", "--out", str(tmp_path / "q")] + args[13:-2]
    assert quick[9] == "--methods" and quick[-2:] == ["--threads", "1"]
    r = _cli(quick)
    assert r.exit_code == 0 and "ttft_device" not in json.load(open(tmp_path / "q" / "results.json"))
