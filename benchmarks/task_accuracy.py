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

Run: ``.venv/bin/python benchmarks/task_accuracy.py`` (about 10-15 minutes on 2 CPU threads).
Writes ``benchmarks/results/task_accuracy.json`` and ``task_accuracy.png``.
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
    from edgekv.export.keymodel import KeyModel
    from edgekv.format import Memory
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--slots", type=int, default=72, help="memory budget in entries (bytes derived)")
    ap.add_argument("--steps", type=int, default=None, help="selection steps (default: AdaptConfig's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    import torch

    from edgekv.data import read_examples, write_jsonl
    from edgekv.export.models import load_backbone
    from edgekv.induce.adapt import AdaptConfig, adapt, memory_spec

    torch.set_num_threads(args.threads)
    t0 = time.time()
    bb = load_backbone(args.model)
    cfg = AdaptConfig(seed=args.seed)
    if args.steps is not None:
        from dataclasses import replace

        cfg = replace(cfg, selection=replace(cfg.selection, steps=args.steps))
    spec = memory_spec(bb, cfg)
    budget = spec.file_bytes_for(args.slots)
    tasks = ["codes", "numbers"]
    data = {k: split(k, args.seed) for k in tasks}
    result: dict = {"model": args.model, "config": cfg.to_dict(), "slots": args.slots, "budget_bytes": budget,
                    "train_per_task": len(data["codes"][0]), "test_per_task": len(data["codes"][1]),
                    "command": f"python benchmarks/task_accuracy.py --slots {args.slots} --seed {args.seed}"}
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
            result["adapt"].append({k: v for k, v in summary.items() if k != "memory"})
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
    with open(os.path.join(args.out, "task_accuracy.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    plot(result, os.path.join(args.out, "task_accuracy.png"))
    zs = result["zero_shot"]
    print(json.dumps({"zero_shot": {k: zs[k]["accuracy"] for k in tasks}, "accuracy_matrix": A,
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
        ax.bar([x + i * width for x in range(len(tasks))], v, width, label=lab)
    ax.set_xticks([x + width for x in range(len(tasks))])
    ax.set_xticklabels([f"task {i + 1}: {k}" for i, k in enumerate(tasks)])
    ax.set_ylabel("exact-match accuracy (held-out phrasings)")
    ax.set_ylim(0, 1)
    ax.set_title(f"SmolLM2-135M + InduceKV memory ({result['slots']} slots, "
                 f"{result['budget_bytes'] / 2**20:.1f} MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
