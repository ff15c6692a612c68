"""``edgekv bench --ray``: the grid's cells as Ray tasks on a local cluster the tests start
themselves (loopback, 2 CPUs, shut down at the end). The report equals a local run's, number
for number; a worker killed mid-cell is retried and the report is still whole and equal; a
cell that fails is named, never silently missing; without --ray, Ray is never imported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from edgekv.cli import app

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    from edgekv.data.stream import SplitSizes, write_stream

    tmp = tmp_path_factory.mktemp("ray-stream")
    return os.path.dirname(write_stream("tiny", str(tmp / "tiny"), order=["glorp-words", "home-city"],
                                        sizes=SplitSizes(16, 1, 2)))


def _args(model, stream, out):
    return ["bench", "--model", model, "--streams", stream, "--seeds", "0,1", "--budget", "40000", "--budgets",
            "20000,40000", "--methods", "zero-shot,induce", "--quick", "--no-progress", "--threads", "1",
            "--out", str(out)]


def _numbers(out) -> dict:
    """What a report says, without its timings: every run's A, metrics, answers, bytes; the aggregate."""
    res = json.load(open(os.path.join(out, "results.json")))
    stages = {}
    for root, _, files in os.walk(out):
        if "stage.json" in files:
            s = json.load(open(os.path.join(root, "stage.json")))
            stages[os.path.relpath(root, out)] = (s["fingerprint"], s["row"], s["answers"], s["deployed_bytes"])
    return {"aggregate": res["aggregate"], "runs": [r["label"] for r in res["runs"]], "stages": stages}


def test_grid_on_ray_equals_the_local_grid(local_ray, tiny_model_dir, stream, tmp_path):
    model = tiny_model_dir("llama")
    local = CliRunner().invoke(app, _args(model, stream, tmp_path / "local"))
    assert local.exit_code == 0, local.output
    remote = CliRunner().invoke(app, _args(model, stream, tmp_path / "ray") + ["--ray"])
    assert remote.exit_code == 0, remote.output
    a, b = _numbers(tmp_path / "local"), _numbers(tmp_path / "ray")
    assert len(a["stages"]) == 2 * (1 + 2) + 2 * (1 + 1)  # tasks x cells: the sweep (2 budgets) on run 0 only
    assert a == b


def test_a_killed_worker_is_retried_and_nothing_is_missing(local_ray, tiny_model_dir, stream, tmp_path):
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.distributed import RayConfig, run_cells, run_on_ray

    model = tiny_model_dir("llama")
    cfg = BenchConfig(seed=0).quick()
    cells = run_cells([stream], [0, 1], ["induce"], [40000], 40000, str(tmp_path / "o"), cfg, None, grid=True)
    killed = []

    def killer():  # SIGKILL the first worker seen running a cell, once
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for p in psutil.process_iter(["pid", "name", "cmdline"]):
                title = " ".join(p.info["cmdline"] or []) + (p.info["name"] or "")
                if "_remote_cell" in title:
                    time.sleep(1.0)  # mid-cell, not at its start
                    try:
                        os.kill(p.info["pid"], signal.SIGKILL)
                        killed.append(p.info["pid"])
                    except ProcessLookupError:
                        continue
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    got = run_on_ray(cells, model, RayConfig(cpus_per_cell=1, max_retries=2), say=lambda line: None)
    t.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert len(got) == len(cells) == 2 and all(g["last"] is not None for g in got)
    # the stages the retried cells wrote are those a local run writes
    local = tmp_path / "local"
    r = CliRunner().invoke(app, ["bench", "--model", model, "--streams", stream, "--seeds", "0,1", "--budget",
                                 "40000", "--budgets", "40000", "--methods", "induce", "--quick", "--no-progress",
                                 "--threads", "1", "--out", str(local)])
    assert r.exit_code == 0, r.output
    ray_stages = {k: v for k, v in _numbers_stages(tmp_path / "o").items()}
    assert ray_stages == _numbers_stages(local)


def _numbers_stages(out) -> dict:
    found = {}
    for root, _, files in os.walk(out):
        if "stage.json" in files and "tuning" not in root:
            s = json.load(open(os.path.join(root, "stage.json")))
            found[os.path.relpath(root, out)] = (s["fingerprint"], s["row"], s["answers"])
    return found


def test_a_failing_cell_is_named(local_ray, tiny_model_dir, tmp_path):
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.distributed import Cell, RayConfig, run_on_ray
    from edgekv.errors import EdgeKVError

    bad = Cell(str(tmp_path / "no-such-stream"), 0, str(tmp_path / "o"), "zero-shot", 40000,
               BenchConfig().quick().to_dict())
    with pytest.raises(EdgeKVError, match=r"1 of 1 benchmark cells failed on Ray: no-such-stream-s0 zero-shot"):
        run_on_ray([bad], tiny_model_dir("llama"), RayConfig(), say=lambda line: None)


def test_without_ray_flag_ray_is_never_imported():
    code = ("import sys, edgekv.cli, edgekv.commands, edgekv.bench.distributed, edgekv.bench.grid; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_shards_are_whole_batches_in_order():
    from edgekv.scale import shards

    assert shards(20, 8, 2) == [(0, 16), (16, 20)]
    assert shards(20, 8, 3) == [(0, 8), (8, 16), (16, 20)]
    assert shards(5, 8, 4) == [(0, 5)]
    assert shards(64, 8, 3) == [(0, 24), (24, 48), (48, 64)]
    for n, b, p in ((1, 1, 1), (17, 4, 5), (100, 8, 7)):
        got = shards(n, b, p)
        assert got[0][0] == 0 and got[-1][1] == n and all(s % b == 0 for s, _ in got)
        assert all(e == s2 for (_, e), (s2, _) in zip(got, got[1:], strict=False))


def test_adapt_on_ray_writes_the_local_memory_byte_for_byte(local_ray, tiny_model_dir, backbone, tmp_path):
    from dataclasses import replace

    import torch

    from edgekv.data import Example
    from edgekv.induce.adapt import adapt, memory_spec
    from edgekv.induce.config import AdaptConfig, CalibrationConfig, EntryConfig, SelectionConfig
    from edgekv.scale import RayConfig, RayEncoder

    cfg = AdaptConfig(entry=EntryConfig(pooled_len=4), selection=SelectionConfig(steps=2, batch_size=4),
                      calibration=CalibrationConfig(steps=2, batch_size=4), top_k=2, anchors_per_task=3,
                      eval_queries=6)
    words = ["apple", "river", "stone", "fox", "dog", "dots", "world", "blue", "sand", "cloud", "lamp"]

    def task(t):
        return [Example(f"{t}-{i}", f"code for {w} in {t}?", f"K{i}{t[-1]}") for i, w in enumerate(words * 2)]

    bb = backbone("llama")
    budget = memory_spec(bb, cfg).file_bytes_for(12)
    torch.set_num_threads(1)
    enc = RayEncoder(tiny_model_dir("llama"), RayConfig(workers=2, cpus_per_cell=1))
    calls = []

    def counted(*a):
        calls.append(len(a[0]))
        return enc(*a)

    for name, encoder in (("local", None), ("ray", counted)):
        mem = str(tmp_path / f"{name}.ekv")
        for t in ("task1", "task2"):
            adapt(bb, task(t), mem, budget if t == "task1" else None, t, replace(cfg, seed=3), encoder=encoder)
    assert calls == [22, 22]  # both tasks' candidates went through the actors (3 batches of 8: 2 shards)
    assert (tmp_path / "local.ekv").read_bytes() == (tmp_path / "ray.ekv").read_bytes()
