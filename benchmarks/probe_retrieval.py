"""Paraphrase probes for the retrieval key: does a query worded unlike every stored example
find the entries about the right item?

Three probe sets on SmolLM2-135M-Instruct (built-in ``smollm2-135m``), each: N items, 6
phrasing templates; the memory stores 3 phrasings per item, queries use the other 3
(unseen) phrasings; 4 folds choose which 3 are stored. Reported per key design:

* precision@3: mean fraction of the top-3 retrieved entries that are about the query's item
  (3 are stored per item, so 1.0 is reachable);
* hit@1: the best entry is about the right item;
* the worst query template's precision@3 (a phrasing that retrieval handles badly).

Key designs: hidden-state layer, mean vs last-token pooling, and the projection fitted on
the stored keys (``raw``: none; ``centre``: subtract the mean; ``abtt-P``: subtract the mean
and remove the top P principal directions, "all-but-the-top"). Keys are computed once per
prompt from all hidden states (``hidden_states[l]`` equals ``KeyModel(l)`` for l < L; a
check below holds the default against ``KeyModel``).

Run: ``.venv/bin/python benchmarks/probe_retrieval.py`` (about 1 minute on 1 CPU thread).
Writes ``benchmarks/results/probe_retrieval.json`` and ``probe_retrieval.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from task_accuracy import CODE_TEMPLATES, NAMES, NUMBER_TEMPLATES, WORDS  # noqa: E402

PEOPLE = ["Arvel Thorne", "Brisa Kalloway", "Corentin Mabe", "Delphine Ostrova", "Eskil Varga",
          "Farah Quenby", "Gideon Ashcombe", "Halla Riggs", "Isidro Penhallow", "Jessamy Ruel",
          "Kasimir Dovey", "Liesel Amundsen"]
PEOPLE_FACTS = ["city", "instrument", "pet", "car", "sport", "tea", "flower", "book", "game", "coat",
                "hat", "boat"]
PEOPLE_TEMPLATES = [
    "Where does {x} live and what does {x} play?",
    "Tell me about {x}: home town and favourite instrument.",
    "Which city is home to {x}, and which instrument does {x} play?",
    "I would like to know {x}'s city and instrument.",
    "{x} - city of residence? Instrument?",
    "Can you remind me where {x} lives and which instrument they play?",
]
# (stored templates, query templates): 3 phrasings stored per item, the other 3 are queries
FOLDS = [((0, 1, 2), (3, 4, 5)), ((3, 4, 5), (0, 1, 2)), ((0, 2, 4), (1, 3, 5)), ((1, 3, 5), (0, 2, 4))]


def probe_sets() -> dict[str, tuple[list[str], list[str]]]:
    """name -> (items, 6 phrasing templates)."""
    return {
        "people": (PEOPLE, PEOPLE_TEMPLATES),
        "codes": (WORDS, CODE_TEMPLATES),
        "numbers": (NAMES, NUMBER_TEMPLATES),
    }


def all_layer_keys(backbone, prompts: list[str]) -> dict[str, np.ndarray]:
    """pooling -> [num_prompts, L, R]: mean and last-token pooled hidden states of every layer."""
    import torch

    from edgekv.induce.entries import key_ids

    tok = backbone.tokenizer
    means, lasts = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([key_ids(tok, p)])
            out = backbone.decoder(input_ids=ids, output_hidden_states=True, use_cache=False)
            hs = torch.stack(out.hidden_states[:-1], dim=0)[:, 0]  # [L, S, R]: layers 0..L-1, pre-norm
            means.append(hs.mean(dim=1).numpy())
            lasts.append(hs[:, -1].numpy())
    return {"mean": np.stack(means), "last": np.stack(lasts)}


def precision_at(q: np.ndarray, keys: np.ndarray, q_item: np.ndarray, k_item: np.ndarray, k: int):
    """q: [Q, R], keys: [N, R] effective -> (precision@k, hit@1)."""
    sims = q @ keys.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    right = k_item[top] == q_item[:, None]
    return float(right.mean()), float(right[:, 0].mean())


def evaluate(raw: np.ndarray, items: np.ndarray, tmpl: np.ndarray, proj_mode: str, dirs: int, k: int = 3):
    """raw: [P, R] keys of all prompts -> (precision@k, hit@1, worst query template's precision@k)
    over the folds; the projection is fitted on the stored keys only, as on the device."""
    from edgekv.retrieval import KeyProjection, effective_keys, fit_projection

    precs, hits, per_tmpl = [], [], {}
    for stored_t, query_t in FOLDS:
        stored = np.isin(tmpl, stored_t)
        if proj_mode == "raw":
            proj = KeyProjection.identity(raw.shape[1])
        else:
            proj = fit_projection(raw[stored], dirs if proj_mode == "abtt" else 0)
        keys = effective_keys(raw[stored], proj)
        for t in query_t:
            query = tmpl == t
            p, h = precision_at(effective_keys(raw[query], proj), keys, items[query], items[stored], k)
            precs.append(p)
            hits.append(h)
            per_tmpl.setdefault(t, []).append(p)
    return float(np.mean(precs)), float(np.mean(hits)), float(min(np.mean(v) for v in per_tmpl.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from edgekv.host.keymodel import KeyModel
    from edgekv.host.models import default_key_layer, load_backbone
    from edgekv.induce.adapt import AdaptConfig
    from edgekv.induce.entries import key_ids

    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = load_backbone(args.model)
    L = bb.shape.num_layers
    default_layer = default_key_layer(L)
    default_dirs = AdaptConfig().proj_dirs
    layers = sorted({1, 2, 3, 4, 6, 8, 10, 12, 15, 20, 25, L - 1, default_layer})
    variants = [("raw", 0), ("centre", 0)] + [("abtt", d) for d in (1, 2, 3, 5, 8)]
    rows = []
    per_set = {}
    for name, (items, templates) in probe_sets().items():
        prompts, item_idx, tmpl_idx = [], [], []
        for i, x in enumerate(items):
            for t, tpl in enumerate(templates):
                prompts.append(tpl.format(x=x))
                item_idx.append(i)
                tmpl_idx.append(t)
        keys = all_layer_keys(bb, prompts)
        # the cheap all-layers path equals the key function the device runs
        km = KeyModel(bb.decoder, default_layer, "mean")
        ids = torch.tensor([key_ids(bb.tokenizer, prompts[0])])
        with torch.no_grad():
            ref = km(ids, torch.ones_like(ids))[0].numpy()
        assert np.abs(ref - keys["mean"][0, default_layer]).max() < 1e-4
        per_set[name] = (keys, np.array(item_idx), np.array(tmpl_idx))
    for pooling in ("mean", "last"):
        for layer in layers:
            for mode, dirs in variants:
                res = {}
                for name, (keys, items, tmpl) in per_set.items():
                    res[name] = evaluate(keys[pooling][:, layer], items, tmpl, mode, dirs)
                label = mode if mode != "abtt" else f"abtt-{dirs}"
                rows.append({"pooling": pooling, "layer": layer, "projection": label,
                             **{f"p@3_{n}": round(v[0], 3) for n, v in res.items()},
                             **{f"hit@1_{n}": round(v[1], 3) for n, v in res.items()},
                             **{f"worst_template_p@3_{n}": round(v[2], 3) for n, v in res.items()},
                             "p@3_mean": round(float(np.mean([v[0] for v in res.values()])), 3)})
    default = next(r for r in rows if r["pooling"] == "mean" and r["layer"] == default_layer
                   and r["projection"] == f"abtt-{default_dirs}")
    best = max(rows, key=lambda r: r["p@3_mean"])
    os.makedirs(args.out, exist_ok=True)
    result = {
        "model": args.model, "num_layers": L, "sets": {n: len(s[0]) for n, s in probe_sets().items()},
        "stored_per_item": 3, "folds": [list(map(list, f)) for f in FOLDS], "k": 3,
        "default": {"pooling": "mean", "layer": default_layer, "projection": f"abtt-{default_dirs}", **default},
        "best": best, "rows": rows, "seconds": round(time.time() - t0, 1),
        "command": "python benchmarks/probe_retrieval.py",
    }
    with open(os.path.join(args.out, "probe_retrieval.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    plot(rows, layers, default_layer, os.path.join(args.out, "probe_retrieval.png"))
    print(table(rows, default_layer))
    print(f"default (mean, layer {default_layer}, abtt-{default_dirs}): {default}")
    print(f"best: {best}")


def table(rows: list[dict], default_layer: int) -> str:
    """Markdown table: mean pooling at a few layers and last pooling at its best, per projection."""
    head = "| pooling | layer | projection | p@3 people | p@3 codes | p@3 numbers | p@3 mean |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["layer"] in (2, 4, default_layer, 10, 15, 25) or r["projection"] == "abtt-3":
            lines.append(f"| {r['pooling']} | {r['layer']} | {r['projection']} | {r['p@3_people']} | "
                         f"{r['p@3_codes']} | {r['p@3_numbers']} | {r['p@3_mean']} |")
    return "\n".join(lines)


def plot(rows: list[dict], layers: list[int], default_layer: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, pooling in zip(axes, ("mean", "last"), strict=True):
        for label in ("raw", "centre", "abtt-1", "abtt-3", "abtt-8"):
            ys = [next(r["p@3_mean"] for r in rows if r["pooling"] == pooling and r["layer"] == layer
                       and r["projection"] == label) for layer in layers]
            ax.plot(layers, ys, marker="o", label=label)
        ax.axvline(default_layer, color="grey", ls=":", lw=1)
        ax.axhline(0.9, color="red", ls="--", lw=0.8)
        ax.set_title(f"{pooling} pooling")
        ax.set_xlabel("key layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision@3 (mean of 3 probe sets)")
    axes[1].legend(title="projection")
    fig.suptitle("Retrieval of the right item from an unseen phrasing (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
