"""Measure the device runtime's footprint and speed on this host; judge it for a board.

Each measurement runs in a fresh interpreter (``python -m edgekv.devices.profiler``) so
that its resident memory and timings are its own:

* **footprint** -- resident set size (``VmRSS``) after each stage of a real load, and the
  peak (``VmHWM``): imports (runtime overhead) -> decoder + key graph (weights) -> memory
  opened and retriever built (index) -> k entries retrieved, injected, and the context
  filled to its maximum (KV working set). Pages of the memory map are counted apart
  (``Rss`` of that mapping in ``/proc/self/smaps``): they are file-backed and resident
  only where touched. The parts add up to the peak exactly: the last one,
  ``peak_transient``, is the peak minus the final RSS (past and present KV both alive
  during a step, activations).
* **timing** -- time to first token and tokens/s of ``Runtime.generate`` with k entries.
* **bandwidth** -- a numpy copy over a buffer much larger than the caches.

With a :class:`~edgekv.devices.profiles.DeviceProfile`, the report says whether the peak
plus the profile's OS headroom fits its RAM, the largest memory budget that still fits
(see :func:`resident_bytes_per_entry` for what is assumed resident) and a latency
estimate scaled by the bandwidth ratio. Linux only (``/proc``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

from edgekv.configs import Config, knob
from edgekv.errors import EdgeKVError, InputError

DEFAULT_PROMPT = "In one sentence, what does a fixed-size memory of key-value entries give a small model?"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TABLE_ENTRY_RESIDENT = 2 * 64  # slot-table row: mapped page bytes + the copy Memory keeps
PARTS = ("runtime_overhead", "weights", "index", "memory_map", "kv_working_set", "peak_transient")
PART_HELP = {
    "runtime_overhead": "python, numpy, onnxruntime, tokenizers, edgekv imported",
    "weights": "decoder and key graph sessions, tokenizer",
    "index": "slot table copy, effective keys, HNSW graph when used",
    "memory_map": "memory file pages still mapped (the reader unmaps what it copied and preads slots: ~0)",
    "kv_working_set": "injected memory KV and the KV cache at the measured context, arena",
    "peak_transient": "peak above the final RSS: past and present KV alive in one step",
}


@dataclass(frozen=True)
class ProfileConfig(Config):
    """What ``edgekv profile ARTIFACTS`` measures."""

    k: int | None = knob(None, "Entries retrieved per query (default: the k the memory was adapted with).")
    threads: int | None = knob(None, "onnxruntime intra-op threads while measuring (default: onnxruntime decides).")
    context: int | None = knob(None, "Positions to measure the KV working set at (default: the model's maximum).")
    chunk: int = 32  # tokens per forward while filling the context (then one decode step)
    prompt: str = DEFAULT_PROMPT
    decode_tokens: int = 32  # new tokens per timing run
    timing_runs: int = 3  # timing runs after one warm-up; medians are reported
    bandwidth_mib: int = 256  # copy-benchmark buffer (>> last-level cache)
    retrieval: str | None = None  # None: as the runtime chooses; "exact" or "hnsw"
    timeout_s: float = 1800.0  # per measurement subprocess

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 0:
            raise InputError(f"ProfileConfig.k must be >= 0, got {self.k}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"ProfileConfig.threads must be >= 1, got {self.threads}")
        if self.context is not None and self.context < 2:
            raise InputError(f"ProfileConfig.context must be >= 2 tokens, got {self.context}")
        for name in ("chunk", "decode_tokens", "timing_runs", "bandwidth_mib"):
            if getattr(self, name) < 1:
                raise InputError(f"ProfileConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.retrieval not in (None, "exact", "hnsw"):
            raise InputError(f"ProfileConfig.retrieval must be 'exact' or 'hnsw', got {self.retrieval!r}")
        if not self.timeout_s > 0:
            raise InputError(f"ProfileConfig.timeout_s must be > 0, got {self.timeout_s}")


# ---------------------------------------------------------------------------------
# /proc readers (this process)
# ---------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024  # reported in kB
    return out


def mapping_rss(path: str) -> int:
    """Resident bytes of this process's mappings of ``path`` (matched by device and inode)."""
    st = os.stat(path)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                major, minor = (int(x, 16) for x in head[3].split(":"))
                inside = (major, minor, int(head[4])) == want
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
    return total


# ---------------------------------------------------------------------------------
# measurements (each in its own interpreter)
# ---------------------------------------------------------------------------------
class _Stages:
    def __init__(self, memory_path: str | None):
        self.memory_path = memory_path
        self.rows: list[dict] = []

    def mark(self, stage: str) -> None:
        mapped = mapping_rss(self.memory_path) if self.memory_path else 0
        self.rows.append({"stage": stage, "rss_bytes": proc_status()["VmRSS"], "memory_map_rss_bytes": mapped})


def _target_context(manifest: dict, context: int | None) -> int:
    max_positions = int(manifest.get("max_positions") or 0)
    if context is None:
        if not max_positions:
            raise InputError("the artifacts do not state the model's context length; set ProfileConfig.context")
        return max_positions
    if max_positions and context > max_positions:
        raise InputError(f"ProfileConfig.context = {context} exceeds the model's {max_positions} positions")
    return context


def _fill_context(decoder, ids: list[int], past, target: int, chunk: int) -> tuple[object, float]:
    """Prefill ``ids`` after ``past``, feed tokens in chunks to ``target`` - 1 positions, then
    one single-token decode step to ``target``. Returns (past, ms of that last step)."""
    import numpy as np

    _, past = decoder.forward(np.asarray([ids], np.int64), past)
    cycle = np.asarray(ids, np.int64)
    while (pos := past[0][0].shape[2]) < target - 1:
        n = min(chunk, target - 1 - pos)
        _, past = decoder.forward(np.resize(cycle, n)[None, :], past)
    t0 = time.perf_counter()
    _, past = decoder.forward(cycle[-1:][None, :], past)
    return past, (time.perf_counter() - t0) * 1000


def measure_footprint(artifacts: str, memory: str | None, k: int | None, threads: int | None, context: int | None,
                      chunk: int, prompt: str, retrieval: str | None) -> dict:
    """RSS at each stage of loading and running the runtime, and the peak (VmHWM)."""
    stages = _Stages(memory)
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

    from edgekv.compat import runtime_top_k
    from edgekv.format import Memory
    from edgekv.index import IndexConfig, Retriever
    from edgekv.runtime import Runtime
    from edgekv.runtime.decoder import open_session, past_from_memory

    stages.mark("imports")
    rt = Runtime.load(artifacts, memory=None, threads=threads)
    key_session = open_session(os.path.join(artifacts, rt.manifest["key"]["file"]), threads) if memory else None
    stages.mark("weights")
    info: dict = {"retrieval_mode": None, "retrieval_reason": "no memory", "num_memory_tokens": 0, "k": 0}
    if memory:
        # What Runtime.__init__ does with a memory, one stage at a time.
        mem = Memory(memory)
        rt._check_memory(mem)
        k = runtime_top_k(k, mem.top_k, mem.num_used, mem.path)
        rt.memory, rt.key_session = mem, key_session
        index_dir = artifacts if rt.manifest.get("index") else None  # only an index the manifest lists
        rt.retriever = Retriever(mem, index_dir, IndexConfig(), force=retrieval)
        if k > len(rt.retriever):
            raise InputError(f"ProfileConfig.k = {k} is larger than the memory's {len(rt.retriever)} entries")
        info.update(retrieval_mode=rt.retriever.mode, retrieval_reason=rt.retriever.reason, k=k)
    stages.mark("index")
    kv = rt.memory_kv(rt.retrieve(prompt, k)) if memory and k else None
    past = rt.decoder.empty_past() if kv is None else past_from_memory(*kv)
    ids = rt.prompt_ids(prompt)
    target = _target_context(rt.manifest, context)
    used = len(ids) + (0 if kv is None else kv[0].shape[2])
    if used >= target:
        raise InputError(f"the prompt ({len(ids)} tokens) and {used - len(ids)} memory tokens already fill "
                         f"a context of {target}; raise ProfileConfig.context or lower k")
    t0 = time.perf_counter()
    past, step_ms = _fill_context(rt.decoder, ids, past, target, chunk)
    fill_s = time.perf_counter() - t0
    stages.mark("kv")
    info.update(num_memory_tokens=0 if kv is None else int(kv[0].shape[2]), num_prompt_tokens=len(ids),
                context_tokens=int(past[0][0].shape[2]), max_context=int(rt.manifest.get("max_positions") or 0),
                decode_ms_at_context=step_ms, fill_seconds=fill_s)
    return {"stages": stages.rows, "peak_rss_bytes": proc_status()["VmHWM"], **info}


def measure_timing(artifacts: str, memory: str | None, k: int | None, threads: int | None, prompt: str,
                   decode_tokens: int, runs: int, retrieval: str | None) -> dict:
    """Median time to first token and tokens/s of ``Runtime.generate`` over ``runs`` runs."""
    import numpy as np

    from edgekv.runtime import Runtime

    with Runtime.load(artifacts, memory=memory, k=k if memory else 0, threads=threads, retrieval=retrieval) as rt:
        rt.generate(prompt, max_new_tokens=2)  # warm-up: first-run allocations and kernel selection
        results = [rt.generate(prompt, max_new_tokens=decode_tokens) for _ in range(runs)]
    rates = [r.tokens_per_s for r in results if len(r.token_ids) > 1]
    return {
        "ttft_ms": float(np.median([r.ttft_ms for r in results])),
        "tokens_per_s": float(np.median(rates)) if rates else None,
        "generated_tokens": [len(r.token_ids) for r in results],
        "runs": runs,
    }


def measure_bandwidth(mib: int) -> dict:
    """Copy bandwidth (bytes read + bytes written per second, as STREAM counts it), best of 5."""
    import numpy as np

    src = np.ones((mib << 20) // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault both buffers in first
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"copy_gbps": 2 * src.nbytes / best / 1e9, "buffer_bytes": int(src.nbytes)}


CHILDREN = {"footprint": measure_footprint, "timing": measure_timing, "bandwidth": measure_bandwidth}


def run_child(name: str, kwargs: dict, timeout_s: float) -> dict:
    """Run one measurement in a fresh interpreter; its edgekv errors come back as themselves."""
    cmd = [sys.executable, "-m", "edgekv.devices.profiler", name, json.dumps(kwargs)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EdgeKVError(f"profiling step {name!r} took longer than {timeout_s:.0f} s; "
                          f"measure a shorter context (ProfileConfig.context)") from None
    lines = out.stdout.strip().splitlines()
    data = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if out.returncode != 0 or data is None:
        if data and "error" in data:
            import edgekv.errors as errors

            raise getattr(errors, data["class"], EdgeKVError)(data["error"])
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeKVError(f"profiling step {name!r} failed (exit {out.returncode}): {tail[:300]}")
    return data


def _child_main(argv: list[str]) -> int:
    name, kwargs = argv[0], json.loads(argv[1])
    try:
        data = CHILDREN[name](**kwargs)
    except EdgeKVError as e:
        print(json.dumps({"error": str(e), "class": type(e).__name__}))
        return 1
    print(json.dumps(data))
    return 0


# ---------------------------------------------------------------------------------
# turning measurements into a report
# ---------------------------------------------------------------------------------
def breakdown(stages: list[dict], peak: int) -> dict[str, int]:
    """Parts (bytes) from the stage RSS rows; they sum to ``peak`` exactly.

    Memory-map pages are taken out of each stage's RSS so they count once, in
    ``memory_map``; everything else is the RSS growth of its stage.
    """
    rss = {r["stage"]: r["rss_bytes"] for r in stages}
    mapped = {r["stage"]: r["memory_map_rss_bytes"] for r in stages}
    anon = {s: rss[s] - mapped[s] for s in rss}
    return {
        "runtime_overhead": anon["imports"],
        "weights": anon["weights"] - anon["imports"],
        "index": anon["index"] - anon["weights"],
        "memory_map": mapped["kv"],
        "kv_working_set": anon["kv"] - anon["index"],
        "peak_transient": peak - rss["kv"],
    }


def resident_bytes_per_entry(spec, hnsw: bool, m_links: int = 32) -> int:
    """Modelled RSS one more occupied slot adds (not its file size).

    Assumes resident = touched: the runtime reads every occupied slot's retrieval key at
    load (whole pages: ``key_bytes`` rounded up to pages, at most the slot) and keeps its
    effective key as float32 (plus the raw copy while building) and its slot number; the
    HNSW graph adds the vector and 2*M level-0 links per element when it is used. The
    slot's KV payload is read only when retrieved (k per query).
    """
    key_bytes = spec.key_dim * 4
    key_pages = min(spec.slot_bytes, -(-key_bytes // PAGE_BYTES) * PAGE_BYTES)
    retriever = 2 * key_bytes + 8
    graph = key_bytes + 2 * m_links * 4 + 16 if hnsw else 0
    return key_pages + retriever + graph


def largest_fitting_slots(spare: int, num_slots: int, num_entries: int, per_entry: int) -> int:
    """Slots S of a *full* memory whose resident cost fits: spare bytes now, the current
    memory having ``num_slots`` slots with ``num_entries`` occupied."""
    budget = spare + num_slots * TABLE_ENTRY_RESIDENT + num_entries * per_entry
    return max(0, budget // (TABLE_ENTRY_RESIDENT + per_entry))


def device_verdict(report: dict, profile) -> dict:
    """Fit, largest budget and a bandwidth-scaled latency estimate on ``profile``."""
    peak = report["peak_rss_bytes"]
    need = peak + profile.os_headroom_bytes
    out = {
        "name": profile.name, "title": profile.title, "ram_bytes": profile.ram_bytes,
        "os_headroom_bytes": profile.os_headroom_bytes, "available_bytes": profile.available_bytes,
        "needed_bytes": need, "fits": need <= profile.ram_bytes,
        "margin_bytes": profile.ram_bytes - need,
        "recommended_threads": profile.recommended_threads,
        "memory_bandwidth_gbps": profile.memory_bandwidth_gbps, "bandwidth_kind": profile.bandwidth_kind,
    }
    mem = report.get("memory_file")
    if mem:
        spare = profile.available_bytes - peak
        slots = largest_fitting_slots(spare, mem["num_slots"], mem["num_entries"], mem["resident_bytes_per_entry"])
        out["largest_budget_slots"] = slots
        out["largest_budget_bytes"] = mem["header_bytes"] + slots * (64 + mem["slot_bytes"])
        out["fits_when_memory_full"] = peak + mem["full_extra_resident_bytes"] <= profile.available_bytes
    out["estimate"] = latency_estimate(report, profile)
    return out


def latency_estimate(report: dict, profile) -> dict:
    """Host timings scaled by host copy bandwidth / device bandwidth. An estimate."""
    host_bw = report["host_copy_bandwidth_gbps"]
    ratio = host_bw / profile.memory_bandwidth_gbps
    t = report["timing"]
    est = {
        "ttft_ms": t["ttft_ms"] * ratio,
        "tokens_per_s": None if t["tokens_per_s"] is None else t["tokens_per_s"] / ratio,
        "decode_ms_at_context": report["decode_ms_at_context"] * ratio,
        "bandwidth_ratio": ratio,
        "method": (f"estimate: host time x host measured copy bandwidth ({host_bw:.1f} GB/s) / device "
                   f"{profile.bandwidth_kind} bandwidth ({profile.memory_bandwidth_gbps:g} GB/s); decode is "
                   "assumed memory-bound"),
    }
    caveats = []
    if profile.bandwidth_kind == "theoretical":
        caveats.append("the device figure is a theoretical peak and the host's is measured: expect the device "
                       "to be slower than this (boards reach well under their peak in copy benchmarks)")
    if profile.isa != platform.machine():
        caveats.append(f"measured on {platform.machine()}; {profile.isa} kernels and clock speeds differ, and "
                       "prefill (time to first token) is more compute-bound than decode")
    est["caveats"] = caveats
    return est


def _memory_summary(memory: str, hnsw: bool) -> dict:
    from edgekv.format import Memory

    with Memory(memory) as mem:
        spec, n_slots, n_used = mem.spec, mem.num_slots, mem.num_used
        per_entry = resident_bytes_per_entry(spec, hnsw)
        return {
            "path": memory, "file_bytes": mem.file_bytes, "budget_bytes": mem.budget_bytes,
            "disk_bytes": os.stat(memory).st_blocks * 512, "num_slots": n_slots, "num_entries": n_used,
            "slot_bytes": spec.slot_bytes, "header_bytes": spec.header_bytes, "pooled_len": spec.pooled_len,
            "resident_bytes_per_entry": per_entry, "table_resident_bytes_per_slot": TABLE_ENTRY_RESIDENT,
            "full_extra_resident_bytes": (n_slots - n_used) * per_entry,
        }


def _artifact_files(artifacts: str) -> dict:
    """Sizes of the files the runtime loads (from the manifest) and bytes of KV per position."""
    from edgekv.manifest import read_manifest

    m = read_manifest(artifacts, verify_hashes=False)
    sizes = {name: os.path.getsize(os.path.join(artifacts, name)) for name in m.get("files", {})}
    index_path = os.path.join(artifacts, (m.get("index") or {}).get("file") or "index.hnsw")
    not_weights = {m["tokenizer"]["file"], os.path.basename(index_path), "index.json"}
    return {
        "weights_file_bytes": sum(v for name, v in sizes.items() if name not in not_weights),
        "index_file_bytes": os.path.getsize(index_path) if os.path.isfile(index_path) else 0,
        "decoder_weights": m["decoder"].get("weights"),
        "kv_bytes_per_position": 2 * int(m["num_layers"]) * int(m["num_kv_heads"]) * int(m["head_dim"]) * 4,
    }


ASSUMPTIONS = [
    "peak RSS is VmHWM of a fresh process that loads the runtime, retrieves k entries, injects them and fills "
    "the context to the measured length (in chunks, then one decode step)",
    "memory-map pages count where touched (header, slot table, every occupied slot's key, the k retrieved "
    "slots); the file's size matters for storage only. Over many queries more slots get touched; those pages "
    "are clean and file-backed, so the kernel drops them under memory pressure",
    "the largest budget assumes a full memory (every slot occupied) costing resident_bytes_per_entry per slot "
    "plus its slot-table row (64 B mapped + 64 B copied)",
    "page cache for reading the model at load is not counted (reclaimable)",
]


def profile_artifacts(artifacts: str, memory: str | None = None, config: ProfileConfig = ProfileConfig(),
                      device=None, progress: bool = False) -> dict:
    """Measure ``artifacts`` (with ``memory``) on this host; judge for ``device`` if given."""
    if not os.path.isdir(artifacts):
        raise InputError(f"{artifacts}: not a folder; pass the folder `edgekv export` wrote")
    if memory is not None and not os.path.isfile(memory):
        raise InputError(f"{memory}: memory file not found")
    if not os.path.isfile("/proc/self/smaps"):
        raise EdgeKVError("edgekv profile measures through /proc and runs on Linux only")
    c = config
    steps = [
        ("footprint", dict(artifacts=artifacts, memory=memory, k=c.k, threads=c.threads, context=c.context,
                           chunk=c.chunk, prompt=c.prompt, retrieval=c.retrieval)),
        ("timing", dict(artifacts=artifacts, memory=memory, k=c.k, threads=c.threads, prompt=c.prompt,
                        decode_tokens=c.decode_tokens, runs=c.timing_runs, retrieval=c.retrieval)),
        ("bandwidth", dict(mib=c.bandwidth_mib)),
    ]
    from tqdm import tqdm

    results = {}
    for name, kwargs in tqdm(steps, desc="profile", disable=not progress, file=sys.stderr):
        results[name] = run_child(name, kwargs, c.timeout_s)
    fp = results["footprint"]
    report = {
        "artifacts": artifacts, "k": fp["k"], "threads": c.threads,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "peak_rss_bytes": fp["peak_rss_bytes"],
        "breakdown_bytes": breakdown(fp["stages"], fp["peak_rss_bytes"]),
        "breakdown_help": PART_HELP,
        "stages": fp["stages"],
        **{key: fp[key] for key in ("retrieval_mode", "retrieval_reason", "num_memory_tokens", "num_prompt_tokens",
                                    "context_tokens", "max_context", "decode_ms_at_context")},
        "timing": results["timing"],
        "host_copy_bandwidth_gbps": results["bandwidth"]["copy_gbps"],
        "files": _artifact_files(artifacts),
        "memory_file": _memory_summary(memory, fp["retrieval_mode"] == "hnsw") if memory else None,
        "assumptions": ASSUMPTIONS,
    }
    report["kv_cache_bytes_at_context"] = report["files"]["kv_bytes_per_position"] * fp["context_tokens"]
    if device is not None:
        report["device"] = device_verdict(report, device)
    return report


def budget_device_verdict(shape, budget: dict, profile) -> dict:
    """Quick verdict for ``--model/--budget --device``: arithmetic only, weights not included."""
    from edgekv.budget import BudgetConfig, spec_for

    cfg = BudgetConfig(**budget["config"])
    spec = spec_for(shape, cfg)
    slots = budget["num_slots"]
    resident = slots * (TABLE_ENTRY_RESIDENT + resident_bytes_per_entry(spec, slots >= 2048))
    kv = 2 * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 4 * shape.max_positions
    need = resident + kv
    return {
        "name": profile.name, "available_bytes": profile.available_bytes,
        "memory_resident_bytes": resident, "kv_bytes_at_max_context": kv,
        "memory_and_kv_fit": need <= profile.available_bytes,
        "note": "arithmetic, not measured: memory resident cost of a full memory plus past and present KV at the "
                "model's maximum context (float32); weights and runtime overhead are not included. Measure with "
                f"`edgekv profile ARTIFACTS --memory MEM.ekv --device {profile.name}`",
    }


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
