"""Shared helpers for benchmarks: cached exports, timing, JSON + plot output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE = os.environ.get("EDGEKV_BENCH_CACHE", os.path.join(ROOT, ".cache", "bench"))
os.environ.setdefault("EDGEKV_CACHE", os.path.join(ROOT, ".cache", "edgekv"))


def _cache_key(model: str, options: dict) -> str:
    """sha256 of the export's arguments and of the code that shapes an export (export/, edgekv/),
    so a cached export is redone when either changes (e.g. a new default key layer or graph)."""
    import hashlib

    h = hashlib.sha256(json.dumps([model, sorted(options.items())], default=str).encode())
    for sub in ("export", "edgekv"):
        for folder, _, files in sorted(os.walk(os.path.join(ROOT, sub))):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(folder, f), "rb") as fh:
                        h.update(f.encode() + fh.read())
    return h.hexdigest()


def cached_build(name: str, model: str, options: dict, build, done_file: str) -> str:
    """``build(out)`` into the bench cache folder ``name`` unless it holds ``done_file`` and a stamp
    of the same ``model``, ``options`` and export code (:func:`_cache_key`); returns the folder."""
    out = os.path.join(CACHE, name)
    stamp = os.path.join(out, ".bench-cache-key")
    key = _cache_key(model, options)
    cached = None
    if os.path.isfile(os.path.join(out, done_file)) and os.path.isfile(stamp):
        with open(stamp, encoding="utf-8") as f:
            cached = f.read()
    if cached != key:
        build(out)
        with open(stamp, "w", encoding="utf-8") as f:
            f.write(key)
    return out


def export_cached(model: str, name: str, **options) -> str:
    """Export ``model`` into the bench cache; reuse it while the options and the export code are unchanged."""
    from edgekv.export.pipeline import export_model

    return cached_build(name, model, options,
                        lambda out: export_model(model, out, progress=True, force=True, **options), "manifest.json")


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    return path


def child_rss(body: str, extra: str = "{}", runs: int = 1) -> dict:
    """Run ``body`` (Python source) in ``runs`` fresh interpreters, then read each one's
    /proc/self/status: peak (VmHWM, median over the runs; all in ``runs``), resident, anonymous
    and file-backed bytes of the first run, plus ``extra`` (a dict expression evaluated in the child)."""
    code = (f"import json\n{body}"
            "st = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith(('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'))}\n"
            "print(json.dumps({'peak_rss_bytes': st['VmHWM'], 'rss_bytes': st['VmRSS'], 'anon_bytes': st['RssAnon'],"
            f" 'file_bytes': st['RssFile'], **({extra})}}))\n")
    rows = [json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(runs)]
    peaks = [r["peak_rss_bytes"] for r in rows]
    return {**rows[0], "peak_rss_bytes": int(np.median(peaks)), "runs": peaks}


def chat_ids(tok, messages, gen) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template."""
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def build_memory(path: str, bb, examples: list[tuple[str, str]], m: int, budget: int | None = None,
                 task: str = "bench", source_prefix: str = "ex") -> None:
    """One entry per (question, answer): KeyModel key of the question, the chat turn's KV made
    position-free and pooled to m (adaptive average), int8; file of ``budget`` bytes (sparse;
    default: just the entries). Entry i is ``task`` / ``f"{source_prefix}{i}"``."""
    import torch

    from edgekv.format import Calibration, Entry, MemorySpec, commit_update, create_memory
    from edgekv.host.keymodel import KeyModel
    from edgekv.host.models import default_key_layer
    from edgekv.retrieval import fit_projection
    from edgekv.rope import remove_rope

    s = bb.shape
    kl = default_key_layer(s.num_layers)
    spec = MemorySpec(s.num_layers, s.num_kv_heads, s.head_dim, m, s.hidden_size, bb.fingerprint, "int8",
                      bb.rope, key_layer=kl)
    if os.path.exists(path):
        os.unlink(path)
    create_memory(path, spec, budget or spec.file_bytes_for(len(examples)),
                  Calibration(0.1, (1.0,) * s.num_layers)).close()
    km = KeyModel(bb.decoder, kl)
    pool = torch.nn.functional.adaptive_avg_pool1d
    put, keys = {}, []
    for i, (q, a) in enumerate(examples):
        ids = chat_ids(bb.tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], False)
        with torch.no_grad():
            cache = bb.model(input_ids=torch.tensor([ids]), use_cache=True).past_key_values
            qi = torch.tensor([bb.tokenizer(q).input_ids])
            key = km(qi, torch.ones_like(qi))[0].numpy()
        K = np.stack([layer.keys[0].numpy() for layer in cache.layers])  # [L, H, T, D]
        V = np.stack([layer.values[0].numpy() for layer in cache.layers])
        K = remove_rope(K, bb.rope, np.arange(len(ids)))
        Kp = pool(torch.from_numpy(K).flatten(0, 1).transpose(1, 2), m).transpose(1, 2).reshape(*K.shape[:2], m, -1)
        Vp = pool(torch.from_numpy(V).flatten(0, 1).transpose(1, 2), m).transpose(1, 2).reshape(*V.shape[:2], m, -1)
        put[i] = Entry.from_float(key, Kp.numpy(), Vp.numpy(), "int8", task, f"{source_prefix}{i}")
        keys.append(key)
    commit_update(path, put, projection=fit_projection(np.stack(keys), 3))
