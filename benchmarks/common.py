"""Shared helpers for benchmarks: cached exports, timing, JSON + plot output."""

from __future__ import annotations

import json
import os
import platform

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
