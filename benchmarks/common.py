"""Shared helpers for benchmarks: cached exports, timing, JSON + plot output."""

from __future__ import annotations

import json
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CACHE = os.environ.get("EDGEKV_BENCH_CACHE", os.path.join(ROOT, ".cache", "bench"))
os.environ.setdefault("EDGEKV_CACHE", os.path.join(ROOT, ".cache", "edgekv"))


def export_cached(model: str, name: str, **options) -> str:
    """Export ``model`` once into the bench cache; reuse it afterwards."""
    from edgekv.export.pipeline import export_model

    out = os.path.join(CACHE, name)
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        export_model(model, out, progress=True, **options)
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    return path
