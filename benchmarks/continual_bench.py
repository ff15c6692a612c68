"""The committed continual benchmark: ``edgekv bench`` on the default stream and model, 4 runs.

Runs the grid of 2 stream orders x 2 seeds (resumable; each run's stages live under
``$EDGEKV_CACHE/bench/edge6-tiny-vlm-grid/runs/<stream>-s<seed>``)::

    edgekv bench --model tiny-vlm --streams edge6,edge6-rev --seeds 0,1 --budget 8MiB \
        --budgets 2MiB,4MiB,8MiB,16MiB --methods all --tune lora,replay-lora --ladder \
        --out $EDGEKV_CACHE/bench/edge6-tiny-vlm-grid --threads 2

and copies what people read to ``benchmarks/results/bench/``: the aggregate
(``results.json``, ``results.md``: mean and 95 % bootstrap interval of every metric over
runs x test queries, paired differences against InduceKV) and, under ``runs/<label>/``,
each run's ``results.json``, ``results.md`` and ``plots/``; the grid's ``plots/``, the
ladder (``ladder/``) and the tuning record (``tuning.json``) when they exist. Its cost end to end is
not measured yet; per cell it is in docs/bench.md, "Cost of the full grid". Finished stages are skipped on a rerun, so an
interrupted grid continues. Several processes may run disjoint ``--methods`` into the same
folder at once; a last run with ``--methods all`` then only merges (and measures time to
first token).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = ["--model", "tiny-vlm", "--streams", "edge6,edge6-rev", "--seeds", "0,1", "--budget", "8MiB",
        "--budgets", "2MiB,4MiB,8MiB,16MiB", "--methods", "all", "--tune", "lora,replay-lora", "--ladder",
        "--threads", "2"]


def main() -> None:
    from edgekv.host.models import cache_dir

    out = os.path.join(cache_dir(), "bench", "edge6-tiny-vlm-grid")
    edgekv = os.path.join(os.path.dirname(sys.executable), "edgekv")
    rc = subprocess.run([edgekv, "bench", *ARGS, "--out", out]).returncode
    if rc:
        sys.exit(rc)
    dest = os.path.join(HERE, "results", "bench")
    os.makedirs(dest, exist_ok=True)
    for name in ("results.json", "results.md", "tuning.json"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(dest, name))
    for folder in ("plots", "ladder"):
        if os.path.isdir(os.path.join(out, folder)):
            shutil.copytree(os.path.join(out, folder), os.path.join(dest, folder), dirs_exist_ok=True)
    for label in sorted(os.listdir(os.path.join(out, "runs"))):
        src, to = os.path.join(out, "runs", label), os.path.join(dest, "runs", label)
        os.makedirs(to, exist_ok=True)
        for name in ("results.json", "results.md"):
            shutil.copyfile(os.path.join(src, name), os.path.join(to, name))
        shutil.copytree(os.path.join(src, "plots"), os.path.join(to, "plots"), dirs_exist_ok=True)


if __name__ == "__main__":
    main()
