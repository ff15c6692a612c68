"""Phrasing directions: concept recall@4 of edge6's val queries by the number removed.

For every val query of edge6 (seed 0, the bench's train sample, tiny-vlm) the top 4 of all
tasks' train examples by cosine of effective keys; recall@4 as in ``probe_keys.py``. The key
projection removes W phrasing directions (the top right singular vectors of the phrasing
sketch: every task's same-answer residuals, ``edgekv.retrieval.add_task_phrasing``, added in
stream order) and then d principal directions of what remains (``fit_projection(keys, d,
V_W)``); W = 0, d = 3 is all-but-the-top, the key before phrasing. ``first_task``: the same on a
memory holding one task (where removing principal directions after the phrasing ones loses the
few that separate its items). Only the val split is read. Run:
``.venv/bin/python benchmarks/probe_phrasing.py`` (about 2 minutes on 2 CPU cores); writes
``benchmarks/results/probe_phrasing.json``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402
from probe_keys import retrieval_stats, val_setup  # noqa: E402

K = 4
WS = (0, 8, 16, 32, 64)
DS = (0, 3)
FIRST = ("shape-code", "glorp-words", "digit-velan", "home-city")


def recall_table(Kt, Kq, tl, ql, train, tasks_in_order) -> list[dict]:
    from edgekv.retrieval import add_task_phrasing, effective_keys, fit_projection, sketch_dirs

    sketch = None
    for t in tasks_in_order:
        ix = [i for i, (name, _) in enumerate(train) if name == t]
        sketch = add_task_phrasing(sketch, Kt[ix], [train[i][1].answer for i in ix], 64)
    rows = []
    for w in WS:
        for d in DS:
            proj = fit_projection(Kt, d, sketch_dirs(sketch, w))
            stats = retrieval_stats(effective_keys(Kq, proj) @ effective_keys(Kt, proj).T, tl, ql, K)
            rows.append({"phrase_dirs": w, "proj_dirs": d, "tasks": {t: s["recall"] for t, s in stats.items()},
                         "recall": round(float(np.mean([s["recall"] for s in stats.values()])), 1)})
            print(w, d, rows[-1]["recall"], rows[-1]["tasks"], flush=True)
    return rows


def main() -> None:
    import torch

    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.adapt import AdaptConfig, memory_spec
    from edgekv.induce.entries import example_keys

    t0 = time.perf_counter()
    tasks, bb, train, queries, tl, ql = val_setup()
    spec = memory_spec(bb, AdaptConfig())
    km = KeyModel(bb.decoder, spec.key_layer, spec.key_pooling)
    with torch.no_grad():
        Kt = example_keys(bb, km, [e for _, e in train]).astype(np.float64)
        Kq = example_keys(bb, km, [e for _, e in queries]).astype(np.float64)
    order = [t.name for t in tasks]
    all_tasks = recall_table(Kt, Kq, tl, ql, train, order)
    first = {}
    for t in FIRST:
        ix = [i for i, (name, _) in enumerate(train) if name == t]
        qx = [i for i, (name, _) in enumerate(queries) if name == t]
        first[t] = recall_table(Kt[ix], Kq[qx], [tl[i] for i in ix], [ql[i] for i in qx], [train[i] for i in ix], [t])
    write_json("probe_phrasing.json", {
        "command": "python benchmarks/probe_phrasing.py", "model": "tiny-vlm", "stream": "edge6", "seed": 0,
        "split": "val", "k": K, "key_layer": spec.key_layer, "num_train": len(train), "num_queries": len(queries),
        "all_tasks": all_tasks, "first_task": first, "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
