"""Where the runtime's peak RSS goes, against the target peak RSS int4 / llama.cpp Q4_1 <= 1.10.

``benchmarks/perf_bench.py`` measures peak RSS (VmHWM) of a fresh process that loads the int4
export with a memory and generates 32 tokens, against llama.cpp on the same GGUF. This script
splits that figure, each row a fresh interpreter (``common.child_rss``):

* ``imports``: numpy, onnxruntime, tokenizers and edgekv's runtime imported, nothing loaded;
* ``ort_session``: a plain ``onnxruntime.InferenceSession`` on the export's ``model.onnx``;
* ``load``: ``Runtime.load`` without a memory (decoder and key sessions, shared weight tables);
* ``generate``: load with the 10 MB memory and generate 32 tokens (perf_bench's figure);
* ``no_prepack``, ``no_arena``, ``no_arena_no_prepack``: ``generate`` with onnxruntime's
  ``session.disable_prepacking`` and/or ``enable_cpu_mem_arena = False`` on every session.

Peak, resident, anonymous and file-backed bytes per row. Memory, not time: rows are valid
beside other work. Needs perf_bench's cached exports (``perf_bench.py --prepare``). Run:
``.venv/bin/python benchmarks/rss_profile.py`` (about 1 minute); writes
``benchmarks/results/rss_profile.json``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import CACHE, child_rss, write_json  # noqa: E402

ART = os.path.join(CACHE, "perf-int4")
MEM = os.path.join(CACHE, "perf-facts-10MB.ekv")
QUERY = "What is the code for apple?"
GENERATE = ("from edgekv.runtime import Runtime\n"
            f"rt = Runtime.load({ART!r}, memory={MEM!r}, k=4, threads=2)\n"
            f"r = rt.generate({QUERY!r}, max_new_tokens=32)\n")


def with_options(config: dict[str, str], arena: bool = True) -> str:
    """Source that wraps the runtime's session options with extra onnxruntime settings."""
    lines = ["import edgekv.runtime.decoder as D, edgekv.runtime.runtime as RR",
             "_so = D.session_options", "def so(*a, **kw):", "    o = _so(*a, **kw)"]
    lines += [f"    o.add_session_config_entry({k!r}, {v!r})" for k, v in config.items()]
    lines += [] if arena else ["    o.enable_cpu_mem_arena = False"]
    lines += ["    return o", "D.session_options = so", "RR.session_options = so", ""]
    return "\n".join(lines)


ROWS = {
    "imports": ("import numpy, onnxruntime, tokenizers\nfrom edgekv.runtime import Runtime\n", "{}"),
    "ort_session": ("import onnxruntime as ort\n"
                    f"s = ort.InferenceSession({os.path.join(ART, 'model.onnx')!r}, ort.SessionOptions(), "
                    "providers=['CPUExecutionProvider'])\n", "{}"),
    "load": ("from edgekv.runtime import Runtime\n"
             f"rt = Runtime.load({ART!r}, memory=None, k=4, threads=2)\n", "{}"),
    "generate": (GENERATE, "{'tokens': len(r.token_ids)}"),
    "no_prepack": (with_options({"session.disable_prepacking": "1"}) + GENERATE, "{'tokens': len(r.token_ids)}"),
    "no_arena": (with_options({}, arena=False) + GENERATE, "{'tokens': len(r.token_ids)}"),
    "no_arena_no_prepack": (with_options({"session.disable_prepacking": "1"}, arena=False) + GENERATE,
                            "{'tokens': len(r.token_ids)}"),
}


def main() -> None:
    if not os.path.isfile(os.path.join(ART, "manifest.json")) or not os.path.isfile(MEM):
        sys.exit(f"missing {ART} or {MEM}: run `.venv/bin/python benchmarks/perf_bench.py --prepare` first")
    mib = 2 ** 20
    root = os.path.dirname(HERE)
    out = {"artifacts": os.path.relpath(ART, root), "memory": os.path.relpath(MEM, root), "rows": {}}
    for name, (body, extra) in ROWS.items():
        r = child_rss(body, extra, 3)
        out["rows"][name] = r
        print(f"{name:20s} peak {r['peak_rss_bytes'] / mib:6.1f} MiB  resident {r['rss_bytes'] / mib:6.1f}  "
              f"anon {r['anon_bytes'] / mib:6.1f}  file {r['file_bytes'] / mib:6.1f}", flush=True)
    write_json("rss_profile.json", out)


if __name__ == "__main__":
    main()
