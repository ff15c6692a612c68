"""Task accuracy on SmolLM2-135M: zero-shot vs. an adapted memory, then retention after task 2.

Two tasks no model can know zero-shot:

* ``codes``: 24 words, each mapped to an arbitrary code (``apple`` -> ``Q8C``);
* ``numbers``: 24 invented people, each with an arbitrary 4-digit secret number.

Each item has 6 phrasing templates. Templates 0-3 are the training data (96 examples per
task); templates 4-5 are held out: every test query is worded unlike any stored example.
Metric: exact match of the greedy answer (stripped) with the code, generated through the
torch induction path (:class:`edgekv.induce.torch_induction.Induction`, the runtime's
arithmetic) from the memory file ``edgekv adapt`` wrote.

Protocol: zero-shot on both tasks; adapt task 1 (``codes``) into a fresh memory at a budget
of ``--slots`` entries; test task 1; adapt task 2 (``numbers``) into the same file; test both
(retention of task 1 = accuracy after task 2). The file size is checked to be identical.

Run: ``.venv/bin/python benchmarks/task_accuracy.py`` (about 8-15 minutes on 2 CPU threads).
Writes ``benchmarks/results/task_accuracy.json`` and ``task_accuracy.png``.
``--ablations`` instead measures entry construction and alpha scaling
(``task_ablations.json``, about 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

WORDS = ["apple", "river", "stone", "candle", "mirror", "garden", "thunder", "pencil", "violin", "harbor",
         "blanket", "rocket", "pepper", "lantern", "meadow", "castle", "anchor", "feather", "glacier", "kettle",
         "orchid", "saddle", "tunnel", "walnut"]
CODE_TEMPLATES = [
    "What is the code for {x}?",
    "Tell me the code assigned to {x}.",
    "Which code does the word {x} have?",
    "I need the code of {x}, please.",
    "{x}: what code goes with it?",
    "Give the code that belongs to {x}.",
]
NAMES = ["Orlan Vesk", "Mira Toltz", "Bram Quill", "Selka Dunmar", "Tovin Rask", "Ilsa Harrow", "Quen Abade",
         "Dorin Falk", "Yara Mosk", "Petr Ulvane", "Nessa Crow", "Jori Tamsin", "Kelm Ardis", "Vina Solberg",
         "Hadrik Lum", "Zeta Carrow", "Ulric Penn", "Fenna Dross", "Ardo Kime", "Lisbet Vorn", "Cato Reeve",
         "Runa Halt", "Emric Sol", "Gwen Tarrow"]
NUMBER_TEMPLATES = [
    "What is the secret number of {x}?",
    "Tell me {x}'s secret number.",
    "Which secret number belongs to {x}?",
    "I forgot the secret number that {x} uses. What is it?",
    "{x} has a secret number. Which one?",
    "Do you know the secret number for {x}?",
]
TRAIN_TEMPLATES = (0, 1, 2, 3)
TEST_TEMPLATES = (4, 5)


def make_task(kind: str, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(items, templates, answers) of a task; answers are seeded and arbitrary."""
    rng = random.Random(seed)
    if kind == "codes":
        letters = "BCDFGHJKLMNPQRSTVWXZ"
        answers = [rng.choice(letters) + str(rng.randint(2, 9)) + rng.choice(letters) for _ in WORDS]
        return WORDS, CODE_TEMPLATES, answers
    if kind == "numbers":
        return NAMES, NUMBER_TEMPLATES, [str(rng.randint(1000, 9999)) for _ in NAMES]
    raise ValueError(f"unknown task {kind!r}")


def split(kind: str, seed: int = 0):
    """-> (train examples, test queries [(item, prompt, answer)])."""
    from edgekv.data import Example

    items, templates, answers = make_task(kind, seed)
    train = [Example(f"{kind}-{i}-t{t}", templates[t].format(x=x), a)
             for i, (x, a) in enumerate(zip(items, answers, strict=True)) for t in TRAIN_TEMPLATES]
    test = [(i, templates[t].format(x=x), a)
            for i, (x, a) in enumerate(zip(items, answers, strict=True)) for t in TEST_TEMPLATES]
    return train, test


def load_memory_induction(bb, memory_path: str, top_k: int):
    """(Induction over the memory's entries, key model, projection, calibration, bank)."""
    from edgekv.format import Memory
    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.adapt import effective, read_bank
    from edgekv.induce.torch_induction import Induction

    with Memory(memory_path) as mem:
        bank, _ = read_bank(mem)
        spec, proj, cal = mem.spec, mem.projection, mem.calibration
    ind = Induction(bb.model, bank, effective(bank.raw_keys, proj), top_k, spec.rope)
    return ind, KeyModel(bb.decoder, spec.key_layer, spec.key_pooling), proj, cal, bank


def evaluate(bb, kind: str, test, memory_path: str | None, top_k: int, max_new_tokens: int = 8) -> dict:
    """Exact-match accuracy of greedy answers (and retrieval precision with a memory)."""
    import numpy as np
    import torch

    from edgekv.induce.adapt import effective
    from edgekv.induce.entries import key_ids, query_ids, raw_keys
    from edgekv.induce.torch_induction import Bank, Induction

    tok, eos = bb.tokenizer, set(bb.eos_token_ids)
    if memory_path is None:
        empty = Bank(np.zeros((0, bb.shape.hidden_size), np.float32), torch.zeros(0), torch.zeros(0))
        ind, km, proj, gates, tau = Induction(bb.model, empty, torch.zeros((0, 1)), top_k, bb.rope), None, None, [], 1.0
    else:
        ind, km, proj, cal, bank = load_memory_induction(bb, memory_path, top_k)
        gates, tau = cal.gates, cal.tau
    q = None if km is None else effective(raw_keys(km, [key_ids(tok, p) for _, p, _ in test]), proj)
    correct, contains, precision, samples = 0, 0, [], []
    for j, (item, prompt, answer) in enumerate(test):
        out, idx = ind.generate(q[j] if q is not None else None, query_ids(tok, prompt), tau, gates,
                                max_new_tokens, eos, use_memory=km is not None)
        text = tok.decode(out, skip_special_tokens=True).strip()
        correct += text == answer
        contains += answer in text
        if idx is not None:
            right = [ind.bank.source_ids[r].startswith(f"{kind}-{item}-") for r in idx.tolist()]
            precision.append(float(np.mean(right)))
        if j < 4:
            samples.append({"prompt": prompt, "answer": answer, "output": text})
    n = len(test)
    return {"accuracy": correct / n, "contains": contains / n, "num_queries": n,
            "retrieval_precision": float(np.mean(precision)) if precision else None, "samples": samples}


def items_covered(memory_path: str, tasks: list[str]) -> dict:
    """Per task: how many items have at least one entry in the memory, and entries per item."""
    from collections import Counter

    from edgekv.format import Memory

    with Memory(memory_path) as mem:
        ids = [mem.slot_info(int(s))["source_id"] for s in mem.occupied()]
    out = {}
    for kind in tasks:
        per_item = Counter(i.split("-")[1] for i in ids if i.startswith(kind + "-"))
        out[kind] = {"items_with_entries": len(per_item), "max_per_item": max(per_item.values(), default=0)}
    return out


def ablations(bb, out_dir: str, num_test: int = 24) -> dict:
    """How entries are built and weighted, on task 1 (codes), no selection, no calibration.

    * pooling: oracle retrieval (the 3 entries of the query's own word, uniform weights), so
      only the entry's content varies: pooling strategy, m, and the template preamble;
    * scaling: real retrieval (top-k over all 96 entries), the runtime's sqrt(k * alpha)
      against the paper's plain sqrt(alpha), for k = 1..4.
    """
    from edgekv.host.keymodel import KeyModel
    from edgekv.host.models import default_key_layer
    from edgekv.induce import torch_induction as ti
    from edgekv.induce.adapt import effective
    from edgekv.induce.entries import EntryConfig, compute_entries, key_ids, query_ids, raw_keys
    from edgekv.induce.torch_induction import Induction, bank_from_entries, subset_bank
    from edgekv.retrieval import fit_projection

    s = bb.shape
    L = s.num_layers
    tok, eos = bb.tokenizer, set(bb.eos_token_ids)
    km = KeyModel(bb.decoder, default_key_layer(L))
    train, test = split("codes")
    test = test[:num_test]
    res: dict = {"pooling": [], "scaling": [], "num_test": len(test)}

    def run(ind, tau, q, rows_of=None):
        correct = 0
        for j, (item, prompt, answer) in enumerate(test):
            use = ind if rows_of is None else rows_of(item)
            out, _ = use.generate(q[j], query_ids(tok, prompt), tau, [1.0] * L, 8, eos)
            correct += tok.decode(out, skip_special_tokens=True).strip() == answer
        return correct / len(test)

    q_raw = raw_keys(km, [key_ids(tok, p) for _, p, _ in test])
    for pooling, m, skip in [("answer", 16, True), ("answer", 12, True), ("answer", 24, True),
                             ("answer_avg", 16, True), ("answer_avg", 24, True), ("adaptive", 16, True),
                             ("adaptive", 24, True), ("answer", 16, False), ("answer", 24, False)]:
        cfg = EntryConfig(pooled_len=m, pooling=pooling, skip_template_prefix=skip)
        entries, _ = compute_entries(bb, train, km, cfg, "codes")
        bank = bank_from_entries(entries, L, s.hidden_size, (L, s.num_kv_heads, m, s.head_dim))
        proj = fit_projection(bank.raw_keys, 3)
        P, q = effective(bank.raw_keys, proj), effective(q_raw, proj)

        def oracle(item, bank=bank, P=P):
            rows = [n for n, e in enumerate(train) if e.id.startswith(f"codes-{item}-")][:3]
            return Induction(bb.model, subset_bank(bank, rows), P[rows], 3, bb.rope)

        acc = run(None, 1e6, q, oracle)  # tau huge: uniform weights
        res["pooling"].append({"pooling": pooling, "pooled_len": m, "skip_template_prefix": skip, "accuracy": acc})
        print(json.dumps(res["pooling"][-1]), flush=True)
        if (pooling, m, skip) == ("answer", 16, True):
            keep = (bank, P, q)
    bank, P, q = keep
    orig = ti.memory_kv
    for scaling in ("sqrt_k_alpha", "sqrt_alpha"):
        def patched(K, V, idx, alpha, gates, rope, start_position=0, scaling=scaling):
            a = alpha / alpha.shape[1] if scaling == "sqrt_alpha" else alpha  # sqrt(k * a/k) = sqrt(a)
            return orig(K, V, idx, a, gates, rope, start_position)

        ti.memory_kv = patched
        try:
            for k in (1, 2, 3, 4):
                for tau in ((0.05,) if k == 1 else (0.05, 0.2)):
                    if k == 1 and scaling == "sqrt_alpha":
                        continue  # identical to sqrt_k_alpha at k = 1
                    acc = run(Induction(bb.model, bank, P, k, bb.rope), tau, q)
                    res["scaling"].append({"scaling": scaling, "k": k, "tau": tau, "accuracy": acc})
                    print(json.dumps(res["scaling"][-1]), flush=True)
        finally:
            ti.memory_kv = orig
    with open(os.path.join(out_dir, "task_ablations.json"), "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--slots", type=int, default=72, help="memory budget in entries (bytes derived)")
    ap.add_argument("--steps", type=int, default=None, help="selection steps (default: AdaptConfig's)")
    ap.add_argument("--beta", type=float, default=None, help="anchor weight (default: AdaptConfig's)")
    ap.add_argument("--gamma", type=float, default=None, help="coverage weight (default: AdaptConfig's)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--ablations", action="store_true", help="run the entry/scaling ablations instead")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    import torch

    from edgekv.data import read_examples, write_jsonl
    from edgekv.host.models import load_backbone
    from edgekv.induce.adapt import AdaptConfig, adapt, memory_spec

    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = load_backbone(args.model)
    if args.ablations:
        os.makedirs(args.out, exist_ok=True)
        ablations(bb, args.out)
        return
    cfg = AdaptConfig(seed=args.seed)
    from dataclasses import replace

    for name in ("steps", "beta", "gamma"):
        if getattr(args, name) is not None:
            cfg = replace(cfg, selection=replace(cfg.selection, **{name: getattr(args, name)}))
    spec = memory_spec(bb, cfg)
    budget = spec.file_bytes_for(args.slots)
    tasks = ["codes", "numbers"]
    data = {k: split(k, args.seed) for k in tasks}
    result: dict = {"model": args.model, "config": cfg.to_dict(), "slots": args.slots, "budget_bytes": budget,
                    "train_per_task": len(data["codes"][0]), "test_per_task": len(data["codes"][1]),
                    "command": "python " + " ".join(sys.argv)}
    print(f"zero-shot ({time.time() - t0:.0f} s)", flush=True)
    result["zero_shot"] = {k: evaluate(bb, k, data[k][1], None, cfg.top_k) for k in tasks}
    with tempfile.TemporaryDirectory() as tmp:
        mem = os.path.join(tmp, "memory.ekv")
        result["after_task"], result["adapt"], sizes = [], [], []
        for i, kind in enumerate(tasks):
            path = os.path.join(tmp, f"{kind}.jsonl")
            write_jsonl(path, data[kind][0])
            print(f"adapt {kind} ({time.time() - t0:.0f} s)", flush=True)
            summary = adapt(bb, read_examples(path), mem, budget if i == 0 else None, kind, cfg, progress=True)
            sizes.append(os.path.getsize(mem))
            summary["items_covered"] = items_covered(mem, tasks)
            rec = {k: v for k, v in summary.items() if k != "memory"}
            # the memory lives in a temporary folder: record the anchors file relative to it
            rec["anchors"] = {**rec["anchors"], "path": os.path.relpath(rec["anchors"]["path"], tmp)}
            result["adapt"].append(rec)
            print(f"evaluate after {kind} ({time.time() - t0:.0f} s)", flush=True)
            result["after_task"].append({k: evaluate(bb, k, data[k][1], mem, cfg.top_k) for k in tasks[: i + 1]})
        result["file_sizes"] = sizes
    A = [[result["after_task"][i][k]["accuracy"] if k in result["after_task"][i] else None for k in tasks]
         for i in range(len(tasks))]
    result["accuracy_matrix"] = A
    result["retention_task1"] = A[1][0] / A[0][0] if A[0][0] else None
    result["bwt"] = A[1][0] - A[0][0]
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"task_accuracy{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    plot(result, os.path.join(args.out, f"task_accuracy{args.tag}.png"))
    zs = result["zero_shot"]
    print(json.dumps({"zero_shot": {k: zs[k]["accuracy"] for k in tasks}, "accuracy_matrix": A,
                      "covered": [a["items_covered"] for a in result["adapt"]],
                      "precision": [{k: v["retrieval_precision"] for k, v in r.items()} for r in result["after_task"]],
                      "file_sizes": result["file_sizes"], "seconds": result["seconds"]}, indent=1))


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = ["codes", "numbers"]
    labels = ["zero-shot", "after task 1 (codes)", "after task 2 (numbers)"]
    vals = [[result["zero_shot"][k]["accuracy"] for k in tasks]]
    vals += [[r.get(k, {}).get("accuracy", float("nan")) for k in tasks] for r in result["after_task"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, (lab, v) in enumerate(zip(labels, vals, strict=True)):
        xs = [x + i * width for x in range(len(tasks))]
        ax.bar(xs, v, width, label=lab)
        for x, y in zip(xs, v, strict=True):
            if y == y:  # not NaN
                ax.text(x, y + 0.01, f"{y:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([x + width for x in range(len(tasks))])
    ax.set_xticklabels([f"task {i + 1}: {k}" for i, k in enumerate(tasks)])
    ax.set_ylabel("exact-match accuracy (held-out phrasings)")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"SmolLM2-135M + InduceKV memory ({result['slots']} slots, "
                 f"{result['budget_bytes'] / 2**20:.1f} MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
