"""The committed continual benchmark: ``edgekv bench`` on the default stream and model.

Runs (resumable; the stages live under ``$EDGEKV_CACHE/bench/edge6-tiny-vlm``)::

    edgekv bench --model tiny-vlm --stream edge6 --budget 8MiB --budgets 2MiB,4MiB,8MiB \
        --methods all --out $EDGEKV_CACHE/bench/edge6-tiny-vlm --threads 2

and copies what people read (``results.json``, ``results.md``, ``plots/``) to
``benchmarks/results/bench/``. About 30-40 minutes of CPU on 2 cores with the default
``BenchConfig``; the stages are skipped on a rerun, so an interrupted run continues.
Several processes may run disjoint ``--methods`` into the same folder at once; a last
run with ``--methods all`` then only merges (and measures time to first token).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ARGS = ["--model", "tiny-vlm", "--stream", "edge6", "--budget", "8MiB", "--budgets", "2MiB,4MiB,8MiB",
        "--methods", "all", "--threads", "2"]


def main() -> None:
    from edgekv.export.models import cache_dir

    out = os.path.join(cache_dir(), "bench", "edge6-tiny-vlm")
    edgekv = os.path.join(os.path.dirname(sys.executable), "edgekv")
    rc = subprocess.run([edgekv, "bench", *ARGS, "--out", out]).returncode
    if rc:
        sys.exit(rc)
    dest = os.path.join(HERE, "results", "bench")
    os.makedirs(dest, exist_ok=True)
    for name in ("results.json", "results.md"):
        shutil.copyfile(os.path.join(out, name), os.path.join(dest, name))
    shutil.copytree(os.path.join(out, "plots"), os.path.join(dest, "plots"), dirs_exist_ok=True)


if __name__ == "__main__":
    main()
