"""Which retrieval key finds the right entries on edge6? Concept recall@k on the val split.

The accuracy ladder (``edgekv bench --ladder``) says where edge6's accuracy is lost: with the
right examples injected (oracle rungs) tiny-vlm answers most val queries; with the real key
retrieving among every train example it answers few. This probe isolates the key: for every
val query of edge6 (seed 0, the bench's train sample), the top-k of all tasks' train examples by
cosine of effective keys (the memory's projection fitted on the train keys), and per task:

* recall@k: right entries (same task and concept) in the top k over min(k, right entries stored)
  (glorp-words and home-city store 2 examples per concept in the bench's 32-example sample, so
  precision@4 cannot exceed 0.5 there; recall can reach 1);
* precision@k and task precision@k (entries of the query's task, whatever the concept).

Key designs: the hidden-state layer; pooling: mean, last token, or ``rare`` (the mean
weighted by log(1 + token id) ** 2, ``edgekv.host.keymodel.rare_weights``: byte-pair ids grow
as tokens get rarer, so a phrasing's common words weigh less than the item's rare name; image
positions carry the image token's id); projection directions removed (all-but-the-top).
On the text tasks alone, the same weights against an ``idf`` weighting (log((N+1)/(df+1)) ** 2
over the train prompts' token ids) that a memory could not use (its statistics change with every
task, and stored keys are frozen): how much of the idf's gain the frozen weight keeps.

Only the val split is read (the rules of measurement: choices on val). Run:
``.venv/bin/python benchmarks/probe_keys.py`` (about 3 minutes on 2 CPU cores); writes
``benchmarks/results/probe_keys.json``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402

K = 4
LAYERS = (1, 2, 4)
POOLINGS = ("mean", "last", "rare")
DIRS = (0, 3)
WEIGHTINGS = ("idf", "rare")


def retrieval_stats(S: np.ndarray, train_labels: list, query_labels: list, k: int) -> dict:
    """Per task (recall@k, precision@k, task precision@k) in %, from similarities S [Q, N]."""
    top = np.argsort(-S, axis=1)[:, :k]  # [Q, k]
    per: dict[str, list[tuple[float, float, float]]] = {}
    for b, rows in enumerate(top):
        right = [train_labels[r] == query_labels[b] for r in rows]
        stored = sum(lab == query_labels[b] for lab in train_labels)
        rec = sum(right) / min(k, stored) if stored else 0.0
        task = float(np.mean([train_labels[r][0] == query_labels[b][0] for r in rows]))
        per.setdefault(query_labels[b][0], []).append((rec, float(np.mean(right)), task))
    return {t: {"recall": round(100 * float(np.mean([v[0] for v in vs])), 1),
                "precision": round(100 * float(np.mean([v[1] for v in vs])), 1),
                "task_precision": round(100 * float(np.mean([v[2] for v in vs])), 1)} for t, vs in per.items()}


def weighted_mean(ids: list[int], h: np.ndarray, weight) -> np.ndarray:
    """Token-weighted mean of hidden states. ids: [S], h: [S, R] -> [R]"""
    w = np.array([weight(i) for i in ids], np.float64)
    return (w[:, None] * h).sum(axis=0) / max(float(w.sum()), 1e-12)


def val_setup():
    """edge6 (seed 0), the bench's train sample and val split, tiny-vlm: -> (tasks, backbone, train
    [(task, Example)], val queries [(task, Example)], their (task, concept) labels)."""
    import torch

    from edgekv.bench.config import BenchConfig
    from edgekv.bench.ladder import example_concept, task_metas
    from edgekv.bench.runner import bench_tasks
    from edgekv.data.stream import load_stream
    from edgekv.host.models import load_backbone

    torch.set_num_threads(2)
    stream = load_stream("edge6", seed=0)
    tasks = bench_tasks(stream, replace(BenchConfig(seed=0), eval_split="val"))
    meta = {m["name"]: m for m in task_metas(stream)}
    bb = load_backbone("tiny-vlm")
    train = [(t.name, e) for t in tasks for e in t.train]
    queries = [(t.name, e) for t in tasks for e in t.val]
    tl = [(t, example_concept(meta[t], e)) for t, e in train]
    ql = [(t, example_concept(meta[t], e)) for t, e in queries]
    return tasks, bb, train, queries, tl, ql


def main() -> None:
    import torch

    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.entries import example_keys, key_ids
    from edgekv.retrieval import effective_keys, fit_projection

    t0 = time.perf_counter()
    tasks, bb, train, queries, tl, ql = val_setup()

    rows = []
    for layer in LAYERS:
        for pooling in POOLINGS:
            km = KeyModel(bb.decoder, layer, pooling)
            with torch.no_grad():
                Kt = example_keys(bb, km, [e for _, e in train])
                Kq = example_keys(bb, km, [e for _, e in queries])
            for dirs in DIRS:
                proj = fit_projection(Kt, dirs)
                S = effective_keys(Kq, proj) @ effective_keys(Kt, proj).T
                stats = retrieval_stats(S, tl, ql, K)
                rows.append({"layer": layer, "pooling": pooling, "dirs": dirs, "tasks": stats,
                             "recall": round(float(np.mean([s["recall"] for s in stats.values()])), 1)})
                print(layer, pooling, dirs, rows[-1]["recall"], {t: s["recall"] for t, s in stats.items()}, flush=True)

    # token-weighted means, text tasks only (image positions have no token id to weigh)
    tok = bb.tokenizer
    text_tasks = [t.name for t in tasks if all(e.image is None for e in t.train)]
    tr = [(i, x) for i, x in enumerate(train) if x[0] in text_tasks]
    qu = [(i, x) for i, x in enumerate(queries) if x[0] in text_tasks]
    df: dict[int, int] = {}
    for _, (_, e) in tr:
        for i in set(key_ids(tok, e.prompt)):
            df[i] = df.get(i, 0) + 1
    n = len(tr)
    weights = {"mean": lambda i: 1.0, "idf": lambda i: float(np.log((n + 1) / (df.get(i, 0) + 1))) ** 2,
               "rare": lambda i: float(np.log1p(i)) ** 2}
    weighted = []
    for layer in LAYERS:
        km = KeyModel(bb.decoder, layer, "mean")

        def hidden(exs, km=km):
            out = []
            with torch.no_grad():
                for _, (_, e) in exs:
                    ids = key_ids(tok, e.prompt)
                    h = km.body(input_ids=torch.tensor([ids]),
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long)).last_hidden_state[0]
                    out.append((ids, h.float().numpy()))
            return out

        Ht, Hq = hidden(tr), hidden(qu)
        for name in ("mean",) + WEIGHTINGS:
            Kt = np.stack([weighted_mean(ids, h, weights[name]) for ids, h in Ht])
            Kq = np.stack([weighted_mean(ids, h, weights[name]) for ids, h in Hq])
            for dirs in DIRS:
                proj = fit_projection(Kt, dirs)
                S = effective_keys(Kq, proj) @ effective_keys(Kt, proj).T
                stats = retrieval_stats(S, [tl[i] for i, _ in tr], [ql[i] for i, _ in qu], K)
                weighted.append({"layer": layer, "weighting": name, "dirs": dirs, "tasks": stats})
                print(layer, name, dirs, {t: s["recall"] for t, s in stats.items()}, flush=True)

    write_json("probe_keys.json", {
        "command": "python benchmarks/probe_keys.py", "model": "tiny-vlm", "stream": "edge6", "seed": 0,
        "split": "val", "k": K, "num_train": len(train), "num_queries": len(queries), "designs": rows,
        "text_weightings": {"tasks": text_tasks, "rows": weighted},
        "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
