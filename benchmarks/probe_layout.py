"""Where the chat template's header sits around injected entries (edge6, val split, oracle entries).

Entries drop the chat template's fixed prefix (``EntryConfig.skip_template_prefix``; on tiny-vlm
it is the 3-token user header ``<|im_start|>user\\n``) and are injected before the whole
templated query. Two alternatives, measured with the right examples injected (the ladder's oracle
rungs: the query's concept, k = 4 train examples of the bench's train sample, uniform alpha,
gates 1; float K/V unpooled (``full``) and pooled to m = 16 (``pooled``)):

* ``drop/after``: as edgekv does (the reference; equal to the ladder's oracle rungs);
* ``drop/prefix_first``: the prefix's K/V first (positions 0..p-1, computed once), the entries
  after it, then the query without the prefix (what caching a constant preamble needs);
* ``keep/after``: entries keep their own prefix (``skip_template_prefix=False``).

Every val query of the six tasks (16-20 per task), greedy, 10 new tokens. Only val is read.
Run: ``.venv/bin/python benchmarks/probe_layout.py`` (about 10 minutes on 2 cores); writes
``benchmarks/results/probe_layout.json``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402

K_MAX = 4
MAX_NEW = 10
VARIANTS = (("drop", "after"), ("drop", "prefix_first"), ("keep", "after"))


def main() -> None:
    import torch
    from probe_keys import val_setup

    from edgekv.bench.evaluate import is_correct
    from edgekv.bench.ladder import float_kv, oracle_past, oracle_rows, query_prompt
    from edgekv.induce.config import EntryConfig
    from edgekv.induce.entries import prefix_kv, query_ids, template_prefix_len
    from edgekv.induce.torch_induction import greedy_decode, make_cache, num_layers_of

    t0 = time.perf_counter()
    tasks, bb, train, queries, tl, ql = val_setup()
    tok = bb.tokenizer
    p = template_prefix_len(tok)
    prefix = query_ids(tok, "hello")[:p]
    (Kp, Vp), = prefix_kv(bb.model, [prefix])
    Kp, Vp = Kp[:, None], Vp[:, None]  # [L, 1, H, p, D], keys rotated to 0..p-1

    train_by_task: dict[str, list] = {}
    for (t, e), (_, c) in zip(train, tl, strict=True):
        train_by_task.setdefault(t, []).append((e, c))
    res: dict[str, dict[str, dict[str, list[int]]]] = {}
    for entries_prefix, layout in VARIANTS:
        for part in ("full", "pooled"):
            res[f"{entries_prefix}/{layout}/{part}"] = {}
    for t in tasks:
        items = train_by_task[t.name]
        concepts = [c for _, c in items]
        qs = [(e, c) for (tn, e), (_, c) in zip(queries, ql, strict=True) if tn == t.name]
        shots = {e.id: [items[r][0] for r in oracle_rows(concepts, c, K_MAX, 0, t.name)] for e, c in qs}
        uniq = list({x.id: x for v in shots.values() for x in v}.values())
        kv = {keep: dict(zip([x.id for x in uniq],
                             float_kv(bb, uniq, EntryConfig(pooled_len=16, skip_template_prefix=keep == "drop")),
                             strict=True)) for keep in ("drop", "keep")}
        for e, _ in qs:
            ids, image = query_prompt(bb, e)
            assert ids[:p] == prefix
            embeds = None if image is None else bb.vision.embed_batch([ids], [image])[0]
            for entries_prefix, layout in VARIANTS:
                cut = p if layout == "prefix_first" else 0
                for part in ("full", "pooled"):
                    kvs = [kv[entries_prefix][x.id][part] for x in shots[e.id]]
                    km, vm = oracle_past(kvs, bb.rope, cut)
                    if cut:
                        km = Kp if km is None else torch.cat([Kp, km], 3)
                        vm = Vp if vm is None else torch.cat([Vp, vm], 3)
                    T = 0 if km is None else int(km.shape[3])
                    q_ids = ids[cut:]
                    inputs = {"input_ids": torch.tensor([q_ids])} if embeds is None else \
                        {"inputs_embeds": embeds[:, cut:]}
                    with torch.no_grad():
                        toks = greedy_decode(bb.model, inputs, torch.arange(T, T + len(q_ids))[None],
                                             make_cache(km, vm, num_layers_of(bb.model)), MAX_NEW,
                                             set(bb.eos_token_ids))
                    pred = tok.decode(toks, skip_special_tokens=True).strip()
                    res[f"{entries_prefix}/{layout}/{part}"].setdefault(t.name, []).append(int(is_correct(pred, e.answer)))
        print(t.name, {k: round(100 * float(np.mean(v[t.name])), 1) for k, v in res.items()}, flush=True)
    rows = {k: {tn: round(100 * float(np.mean(x)), 1) for tn, x in v.items()} for k, v in res.items()}
    for v in rows.values():
        v["mean"] = round(float(np.mean(list(v.values()))), 1)
    write_json("probe_layout.json", {"command": "benchmarks/probe_layout.py", "split": "val", "stream": "edge6",
                                     "model": "tiny-vlm", "prefix_tokens": p, "k": K_MAX, "rows": rows,
                                     "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
