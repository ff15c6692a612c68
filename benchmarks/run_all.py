"""Run every benchmark (what ``make bench`` runs): runtime_bench.py and perf_bench.py first,
then any other ``benchmarks/*.py`` that defines ``main()``, each in its own process (so
resident-memory and timing figures do not leak between them) with default arguments.

Each writes its JSON and plot under ``benchmarks/results/``. Exits non-zero if any failed.

    .venv/bin/python benchmarks/run_all.py [--only perf_bench runtime_bench]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST = ("runtime_bench", "perf_bench")
NOT_BENCHMARKS = ("common", "run_all")


def benchmarks() -> list[str]:
    """Names of scripts with a ``def main(`` at top level, FIRST ones first."""
    found = []
    for name in sorted(os.listdir(HERE)):
        stem = name[:-3]
        if name.endswith(".py") and stem not in NOT_BENCHMARKS:
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                if re.search(r"^def main\(", f.read(), re.MULTILINE):
                    found.append(stem)
    return [n for n in FIRST if n in found] + [n for n in found if n not in FIRST]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run only these benchmarks (names without .py)")
    args = ap.parse_args()
    names = benchmarks()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            sys.exit(f"run_all: unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in args.only]
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, os.path.join(HERE, f"{name}.py")]).returncode
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        sys.exit(f"run_all: {len(failed)} of {len(names)} benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
