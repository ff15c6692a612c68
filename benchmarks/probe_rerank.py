"""Would a lexical reranker fix retrieval on edge6? Concept recall@4 on the val split.

The ladder (``edgekv bench --ladder``) says retrieval loses most on the text tasks: the dense key
(mean of layer-1 states, all-but-the-top projection) ranks entries of the same *phrasing* above
entries of the same *item*. A reranker a device could run without a new frozen key: the dense
top-N, rescored by ``sim + beta * overlap``, where overlap is the idf-weighted share of the query's
token ids found in the entry's prompt, with the idf computed at query time (a memory would store
each entry's prompt ids) either over all stored entries (``global``) or over the N candidates only
(``local``: tokens every candidate shares, such as the phrasing, weigh nothing).

Only the val split is read. Run: ``.venv/bin/python benchmarks/probe_rerank.py`` (about 2 minutes
on 2 CPU cores); writes ``benchmarks/results/probe_rerank.json``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_json  # noqa: E402
from probe_keys import retrieval_stats, val_setup  # noqa: E402

K = 4
NS = (8, 16, 32)
BETAS = (0.5, 1.0, 2.0)


def overlap(q: set[int], t: set[int], idf: dict[int, float]) -> float:
    """idf-weighted share of the query's token ids present in the entry's."""
    total = sum(idf.get(i, 0.0) for i in q)
    return sum(idf.get(i, 0.0) for i in q & t) / total if total > 0 else 0.0


def idf_of(sets: list[set[int]]) -> dict[int, float]:
    df: dict[int, int] = {}
    for s in sets:
        for i in s:
            df[i] = df.get(i, 0) + 1
    return {i: float(np.log((len(sets) + 1) / (d + 1))) for i, d in df.items()}


def reranked(S: np.ndarray, qt: list[set[int]], tt: list[set[int]], n: int, beta: float, local: bool) -> np.ndarray:
    """S [Q, N] with the dense top-n of each row rescored (the rest pushed below them)."""
    out = np.full_like(S, -1e9)
    glob = None if local else idf_of(tt)
    for a, q in enumerate(qt):
        cand = np.argsort(-S[a])[:n]
        idf = idf_of([tt[b] for b in cand]) if local else glob
        for b in cand:
            out[a, b] = S[a, b] + beta * overlap(q, tt[b], idf)
    return out


def summary(stats: dict) -> dict:
    return {"recall": round(float(np.mean([s["recall"] for s in stats.values()])), 1),
            "precision": round(float(np.mean([s["precision"] for s in stats.values()])), 1),
            "tasks": {t: {"recall": s["recall"], "precision": s["precision"]} for t, s in stats.items()}}


def main() -> None:
    import torch

    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.entries import example_keys, key_ids
    from edgekv.retrieval import effective_keys, fit_projection

    t0 = time.perf_counter()
    _, bb, train, queries, tl, ql = val_setup()
    km = KeyModel(bb.decoder, 1, "mean")
    with torch.no_grad():
        kt, kq = example_keys(bb, km, [e for _, e in train]), example_keys(bb, km, [e for _, e in queries])
    proj = fit_projection(kt, 3)
    S = effective_keys(kq, proj) @ effective_keys(kt, proj).T  # [Q, N]
    tt = [set(key_ids(bb.tokenizer, e.prompt)) for _, e in train]
    qt = [set(key_ids(bb.tokenizer, e.prompt)) for _, e in queries]
    rows = [{"rerank": "none", **summary(retrieval_stats(S, tl, ql, K))}]
    for local in (False, True):
        for n in NS:
            for beta in BETAS:
                st = retrieval_stats(reranked(S, qt, tt, n, beta, local), tl, ql, K)
                rows.append({"rerank": "local" if local else "global", "n": n, "beta": beta, **summary(st)})
                print(rows[-1]["rerank"], n, beta, rows[-1]["recall"], flush=True)
    write_json("probe_rerank.json", {"command": "python benchmarks/probe_rerank.py", "model": "tiny-vlm",
                                     "stream": "edge6", "seed": 0, "split": "val", "k": K, "rows": rows,
                                     "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
