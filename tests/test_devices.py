"""Board profiles, the footprint profiler and `edgekv profile`, the hnswlib crash probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgekv.devices.profiler import (
    PARTS,
    ProfileConfig,
    breakdown,
    device_verdict,
    largest_fitting_slots,
    mapping_rss,
    run_child,
)
from edgekv.devices.profiles import DeviceProfile, builtin_names, list_profiles, load_profile
from edgekv.errors import InputError
from edgekv.format import Entry, Memory, MemorySpec, commit_update, create_memory

BUILTIN = ["jetson-orin-nano-8gb", "rpi4-4gb", "rpi5-8gb", "x86-64-laptop"]


# --- profiles ---------------------------------------------------------------------
def test_builtin_profiles_load_with_their_figures():
    assert builtin_names() == BUILTIN
    p = {x.name: x for x in list_profiles()}
    # bandwidth = transfer rate x bus width, from the vendors' memory specs
    assert p["rpi4-4gb"].memory_bandwidth_gbps == pytest.approx(3200e6 * 4 / 1e9)  # LPDDR4-3200, 32 bit
    assert p["rpi5-8gb"].memory_bandwidth_gbps == pytest.approx(4267e6 * 4 / 1e9, abs=0.05)  # LPDDR4X-4267
    assert p["x86-64-laptop"].memory_bandwidth_gbps == pytest.approx(3200e6 * 8 * 2 / 1e9)  # DDR4-3200 x2
    assert p["jetson-orin-nano-8gb"].memory_bandwidth_gbps == 68.0  # NVIDIA data sheet
    assert p["rpi4-4gb"].ram_bytes == 4 * 2**30 and p["rpi5-8gb"].ram_bytes == 8 * 2**30
    assert [p[n].isa for n in BUILTIN] == ["aarch64", "aarch64", "aarch64", "x86_64"]
    for prof in p.values():
        assert prof.bandwidth_kind == "theoretical" and prof.bandwidth_source
        assert prof.available_bytes == prof.ram_bytes - prof.os_headroom_bytes > 0
        assert 1 <= prof.recommended_threads <= prof.cores
        assert DeviceProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof  # JSON round trip


def _user_profile(tmp_path, **changes) -> str:
    data = load_profile("rpi4-4gb").to_dict() | {"name": "my-board"}
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "board.json"
    path.write_text(json.dumps(data))
    return str(path)


_DROP = object()


def test_user_profile_file_loads_with_size_strings(tmp_path):
    p = load_profile(_user_profile(tmp_path, ram_bytes="2GiB", os_headroom_bytes="512MiB"))
    assert (p.name, p.ram_bytes, p.os_headroom_bytes) == ("my-board", 2**31, 2**29)
    assert p.available_bytes == 2**31 - 2**29


@pytest.mark.parametrize("changes, message", [
    ({"ram_bytes": _DROP}, "field 'ram_bytes' is missing"),
    ({"ram_bytes": -1}, "field 'ram_bytes' must be a positive integer"),
    ({"ram_bytes": "lots"}, "field 'ram_bytes': cannot parse size"),
    ({"cores": 2.5}, "field 'cores' must be a positive integer"),
    ({"isa": "mips"}, "field 'isa' must be one of"),
    ({"memory_bandwidth_gbps": 0}, "field 'memory_bandwidth_gbps'"),
    ({"bandwidth_kind": "guess"}, "field 'bandwidth_kind'"),
    ({"recommended_threads": 16}, "field 'recommended_threads' \\(16\\) exceeds 'cores'"),
    ({"os_headroom_bytes": 8 * 2**30}, "field 'os_headroom_bytes'"),
    ({"bandwidth_source": " "}, "field 'bandwidth_source' must not be empty"),
    ({"ram": 1}, "unknown device profile field 'ram'"),
])
def test_bad_user_profile_names_the_field(tmp_path, changes, message):
    path = _user_profile(tmp_path, **changes)
    with pytest.raises(InputError, match=message) as info:
        load_profile(path)
    assert str(info.value).startswith(path)


def test_unknown_device_and_broken_file(tmp_path):
    with pytest.raises(InputError, match="unknown device 'nope': use one of jetson-orin-nano-8gb, rpi4-4gb"):
        load_profile("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a JSON device profile"):
        load_profile(str(bad))


# --- report arithmetic ------------------------------------------------------------
def test_breakdown_parts_sum_to_peak():
    stages = [{"stage": "imports", "rss_bytes": 50, "memory_map_rss_bytes": 0},
              {"stage": "weights", "rss_bytes": 80, "memory_map_rss_bytes": 0},
              {"stage": "index", "rss_bytes": 95, "memory_map_rss_bytes": 4},
              {"stage": "kv", "rss_bytes": 130, "memory_map_rss_bytes": 9}]
    parts = breakdown(stages, peak=150)
    assert parts == {"runtime_overhead": 50, "weights": 30, "index": 11, "memory_map": 9,
                     "kv_working_set": 30, "peak_transient": 20}
    assert list(parts) == list(PARTS) and sum(parts.values()) == 150


def _report(peak: int, num_slots: int = 100, num_entries: int = 10, per_entry: int = 10_000) -> dict:
    return {
        "peak_rss_bytes": peak, "host_copy_bandwidth_gbps": 25.6, "decode_ms_at_context": 8.0,
        "timing": {"ttft_ms": 100.0, "tokens_per_s": 40.0},
        "memory_file": {"num_slots": num_slots, "num_entries": num_entries, "resident_bytes_per_entry": per_entry,
                        "header_bytes": 4096, "slot_bytes": 700_000,
                        "full_extra_resident_bytes": (num_slots - num_entries) * per_entry},
    }


def test_device_verdict_fit_largest_budget_and_estimate():
    dev = load_profile("rpi4-4gb")  # 4 GiB RAM, 1 GiB headroom, 12.8 GB/s
    v = device_verdict(_report(peak=2**30), dev)
    assert v["needed_bytes"] == 2 * 2**30 and v["fits"] and v["margin_bytes"] == 2 * 2**30
    # largest budget: the most slots S of a full memory whose resident cost still fits
    spare, per = dev.available_bytes - 2**30, 10_000

    def extra(s):  # resident bytes a full S-slot memory adds over the measured 100-slot, 10-entry one
        return (s - 100) * 128 + (s - 10) * per

    s = v["largest_budget_slots"]
    assert extra(s) <= spare < extra(s + 1)
    assert v["largest_budget_bytes"] == 4096 + s * (64 + 700_000)
    e = v["estimate"]
    assert e["bandwidth_ratio"] == pytest.approx(25.6 / 12.8)
    assert e["tokens_per_s"] == pytest.approx(20.0) and e["ttft_ms"] == pytest.approx(200.0)
    assert "estimate" in e["method"] and e["caveats"]
    # a peak above the board's RAM does not fit, and no memory budget helps
    v = device_verdict(_report(peak=3 * 2**30 + 1), dev)
    assert not v["fits"] and v["margin_bytes"] == -1
    assert largest_fitting_slots(-10**9, 100, 10, per) == 0


# --- measurements on the tiny Llama export ------------------------------------------
@pytest.fixture(scope="module")
def tiny_memory(backbone, tmp_path_factory):
    """A memory of the test examples with m = 256 positions per entry (slots of ~52 KB)."""
    from test_runtime import build_memory

    path = str(tmp_path_factory.mktemp("dev-mem") / "m.ekv")
    build_memory(path, backbone("llama"), m=256)
    return path


def _memory_of_size(src: str, dst: str, budget: int) -> str:
    """The entries of ``src`` in a memory of ``budget`` bytes; the other slots empty."""
    with Memory(src) as m:
        entries = {int(s): m.read_entry(int(s)) for s in m.occupied()}
        spec, calibration = m.spec, m.calibration
    create_memory(dst, spec, budget, calibration).close()
    commit_update(dst, entries)
    return dst


def test_cli_profile_json_breakdown_adds_up(exported, tiny_memory, tmp_path):
    from typer.testing import CliRunner

    from edgekv.cli import app

    art = exported("llama")
    plot = tmp_path / "breakdown.png"
    res = CliRunner().invoke(app, ["profile", art, "--memory", tiny_memory, "-k", "1", "--context", "400",
                                   "--device", "rpi4-4gb", "--json", "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    parts = d["breakdown_bytes"]
    assert set(parts) == set(PARTS) and sum(parts.values()) == d["peak_rss_bytes"]
    last = d["stages"][-1]
    assert last["stage"] == "kv" and d["peak_rss_bytes"] >= last["rss_bytes"]
    assert parts["runtime_overhead"] > 20 * 2**20 and parts["weights"] > 0 and parts["kv_working_set"] > 0
    # k = 1 entry of m = 256 positions injected, context filled to 400 positions
    assert (d["num_memory_tokens"], d["context_tokens"], d["max_context"]) == (256, 400, 512)
    assert d["kv_cache_bytes_at_context"] == 2 * 3 * 2 * 16 * 4 * 400  # K and V, L x H x D float32
    mem = d["memory_file"]
    assert (mem["num_entries"], mem["slot_bytes"]) == (5, Memory(tiny_memory).spec.slot_bytes)
    # the reader keeps none of the file mapped: keys and table unmapped once copied, slots read with pread
    assert 0 <= parts["memory_map"] < mem["slot_bytes"]
    assert d["retrieval_mode"] == "exact" and d["timing"]["ttft_ms"] > 0 and d["host_copy_bandwidth_gbps"] > 0
    v = d["device"]
    assert v["needed_bytes"] == d["peak_rss_bytes"] + 2**30 and v["fits"] is True
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_rss_does_not_grow_with_memory_file_size(exported, tiny_memory, tmp_path):
    art = exported("llama")
    paths = [_memory_of_size(tiny_memory, str(tmp_path / f"{mb}mb.ekv"), mb * 10**6) for mb in (10, 500)]
    try:
        assert os.path.getsize(paths[1]) > 49 * os.path.getsize(paths[0])
        cfg = ProfileConfig(k=1, context=400)
        peaks = []
        for path in paths:
            fp = run_child("footprint", dict(artifacts=art, memory=path, k=cfg.k, threads=1, context=cfg.context,
                                             chunk=cfg.chunk, prompt=cfg.prompt, retrieval=None), 300)
            peaks.append(fp["peak_rss_bytes"])
        assert abs(peaks[1] - peaks[0]) < 0.05 * peaks[0], peaks
    finally:
        os.unlink(paths[1])  # 500 MB once written (commits copy the file)


def test_mapping_rss_counts_touched_pages(tiny_memory, tmp_path):
    """Control for the test above: the measure does see a memory map's pages once touched."""
    path = _memory_of_size(tiny_memory, str(tmp_path / "10mb.ekv"), 10 * 10**6)
    with Memory(path) as mem:
        before = mapping_rss(path)
        _ = sum(mem._mm[i] for i in range(0, mem.file_bytes, 4096))  # touch every page
        after = mapping_rss(path)
    assert before < 2**20 and after - before >= 0.9 * 10**7


def test_budget_mode_keeps_its_keys_and_adds_a_device_verdict():
    from typer.testing import CliRunner

    from edgekv.cli import app

    runner = CliRunner()
    plain = json.loads(runner.invoke(app, ["profile", "--model", "smollm2-135m", "--budget", "64MB", "--json"]).stdout)
    res = runner.invoke(app, ["profile", "--model", "smollm2-135m", "--budget", "64MB", "--device", "rpi4-4gb",
                              "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert {k: v for k, v in d.items() if k != "device"} == plain
    kv = 2 * 2 * 30 * 3 * 64 * 4 * 8192  # past + present, K and V, float32, 8192 positions
    assert d["device"]["kv_bytes_at_max_context"] == kv and d["device"]["memory_and_kv_fit"] is True
    res = runner.invoke(app, ["profile"])
    assert res.exit_code == 3 and "pass ARTIFACTS" in res.output
    res = runner.invoke(app, ["profile", "--model", "smollm2-135m", "--budget", "64MB", "--device", "nope"])
    assert res.exit_code == 3 and "unknown device" in res.output and "Traceback" not in res.output


# --- ARM portability --------------------------------------------------------------
def test_retriever_falls_back_to_exact_when_hnswlib_crashes(tmp_path):
    """An hnswlib that dies with SIGILL (a build for another CPU) is caught by the probe."""
    from edgekv.index import build_index

    spec = MemorySpec(1, 1, 8, 1, 16, "ab" * 32, "fp16", None)
    path = str(tmp_path / "m.ekv")
    create_memory(path, spec, spec.file_bytes_for(64)).close()
    zeros = np.zeros((1, 1, 1, 8), np.float16)
    rng = np.random.default_rng(3)
    commit_update(path, {i: Entry(rng.normal(size=16), zeros, zeros, task="t") for i in range(64)})
    build_index(path, str(tmp_path))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "hnswlib.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    script = (
        "import json, numpy as np\n"
        "from edgekv.format import Memory\n"
        "from edgekv.index import Retriever\n"
        f"mem = Memory({path!r})\n"
        f"r = Retriever(mem, {str(tmp_path)!r}, force='hnsw')\n"
        "q = np.ones(16, np.float32) / 4\n"
        "slots, _ = r.search(q, 5)\n"
        "want = np.argsort(-(r.keys @ q), kind='stable')[:5]\n"
        "print(json.dumps({'mode': r.mode, 'reason': r.reason, 'ok': slots.tolist() == r.slots[want].tolist()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["mode"] == "exact" and "SIGILL" in data["reason"] and data["ok"]
    # control: without the broken module the same memory and index use HNSW
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1])["mode"] == "hnsw"
