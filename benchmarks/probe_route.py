"""Retrieval policies on a fixed memory: which entries should a query get? (edge6, val split)

The accuracy ladder (``edgekv bench --ladder``) says most of edge6's loss between the right
examples as KV and the memory is retrieval: the right entry is often among the 4 retrieved,
but the others belong to other items or other tasks and the model copies one of them. This
probe takes InduceKV's final memory of a val run (``edgekv bench --split val``, stages kept
under ``--runs``) and answers every val query of all six tasks (Last) with the memory as it is,
changing only which entries are injected and how they are weighted:

* ``default``: top-k by cosine of the effective keys, alpha = softmax(sim / tau): the method;
* ``k2``: k = 2; ``uniform``: alpha = 1/k (no retrieval weighting);
* ``margin05``: drop retrieved entries whose cosine is more than 0.05 below the best;
* ``route<n>``: vote a task among the top n (each entry votes exp(sim / tau) for its task), then
  take the top k among that task's entries only (fewer when it holds fewer than k);
* ``tproj``, ``tproj4cap``: route (n = 8 / 4), then score the routed task's entries with a key
  projection fitted on *that task's stored keys* (all-but-the-top with d directions; a task's
  phrasing variation is its top directions, so removing them leaves the item); d per task chosen
  on the task's training examples only, by leave-one-out answer agreement of the 4 nearest
  (``global`` when no d beats the memory's own projection); ``cap``: d <= entries stored / 4.

Only val queries are read. Which entries are injected changes; the memory, tau and the gates do
not (they were calibrated for the default policy). Policies are patched into the host
evaluator (``edgekv.induce.evaluate.answer_examples``), which is the runtime's decode in torch.

Run (after the val runs, about 1 minute per policy and seed on 2 cores, alone)::

    .venv/bin/python benchmarks/probe_route.py --runs DIR [--seeds 0,1]

``DIR/val-s<seed>/stages/induce/8388608B/task05/state/memory.ekv`` is each seed's final memory
(``edgekv bench --model tiny-vlm --streams edge6 --seeds S --split val --methods induce
--budget 8MiB --out DIR/val-s<seed>``). Writes ``benchmarks/results/probe_route.json`` (resumable:
finished rows are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402

POLICIES = {
    "default": {"kind": "default"},
    "k2": {"kind": "default", "k": 2},
    "uniform": {"kind": "default", "uniform": True},
    "margin05": {"kind": "margin", "d": 0.05},
    "route4": {"kind": "route", "n": 4},
    "route8": {"kind": "route", "n": 8},
    "route16": {"kind": "route", "n": 16},
    "tproj": {"kind": "tproj", "n": 8},
    "tproj4cap": {"kind": "tproj", "n": 4, "cap": True},
}
OUT = os.path.join(HERE, "results", "probe_route.json")


def loo_agreement(E: np.ndarray, answers: np.ndarray, k: int = 4) -> float:
    """Share of each example's k nearest others (cosine of unit rows E [N, R]) with its answer."""
    S = E @ E.T
    np.fill_diagonal(S, -9.0)
    top = np.argsort(-S, axis=1)[:, :k]
    return float(np.mean(answers[top] == answers[:, None]))


def vote_task(sims, tasks: list[str], n: int, tau: float) -> str:
    """The task with the largest sum of exp(sim / tau) among the top n entries. sims: [N] tensor"""
    import torch

    votes: dict[str, float] = {}
    for i in sims.topk(min(n, len(sims))).indices.tolist():
        votes[tasks[i]] = votes.get(tasks[i], 0.0) + float(torch.exp(sims[i] / tau))
    return max(votes, key=votes.get)


class Probe:
    """The patched retrieval: state shared with the patched ``memory_for`` and ``effective``."""

    def __init__(self):
        self.policy: dict = POLICIES["default"]
        self.dirs: dict[str, int] = {}  # task -> d (-1: the memory's projection)
        self.q_raw = self.q_eff = None  # the last keys ``effective`` projected (the queries')

    def install(self) -> None:
        import edgekv.induce.adapt as adapt
        import edgekv.induce.torch_induction as ti

        effective = adapt.effective
        probe = self

        def recording_effective(h, proj):
            out = effective(h, proj)
            probe.q_raw, probe.q_eff = np.asarray(h, np.float32), np.asarray(out)
            return out

        def memory_for(ind, q, source_ids, log_w, tau, gates, leave_one_out=True):
            return probe.memory_for(ind, q, tau, gates)

        self._effective = effective
        adapt.effective = recording_effective
        ti.Induction.memory_for = memory_for

    def memory_for(self, ind, q, tau, gates):
        import torch

        from edgekv.induce.torch_induction import memory_kv_log
        from edgekv.retrieval import effective_keys, fit_projection

        p, tau = self.policy, float(tau)
        with torch.no_grad():
            sims = (q @ ind.P.T)[0]  # [N]
        N = len(sims)
        allowed = torch.ones(N, dtype=torch.bool)
        if p["kind"] in ("route", "tproj"):
            best = vote_task(sims, ind.bank.tasks, p["n"], tau)
            allowed = torch.tensor([t == best for t in ind.bank.tasks])
            d = self.dirs.get(best, -1) if p["kind"] == "tproj" else -1
            if d >= 0:  # rescore the routed task's entries under its own projection
                j = int(np.argmax(self.q_eff @ q[0].numpy()))  # which query this is
                rows = np.where(allowed.numpy())[0]
                pt = fit_projection(ind.bank.raw_keys[rows], d)
                st = effective_keys(ind.bank.raw_keys[rows], pt) @ effective_keys(self.q_raw[j], pt)
                sims = sims.clone()
                sims[torch.as_tensor(rows)] = torch.as_tensor(st, dtype=sims.dtype)
        k = min(p.get("k", ind.top_k), N, int(allowed.sum()))
        top = sims.masked_fill(~allowed, float("-inf")).topk(k).indices  # best first
        if p["kind"] == "margin":
            top = top[sims[top] >= sims[top[0]] - p["d"]]
        idx = top[sims[top].argsort(stable=True)][None]  # [1, k'] layout order, best last
        sel = sims[idx]
        log_alpha = torch.full_like(sel, -np.log(sel.shape[1])) if p.get("uniform") else \
            torch.log_softmax(sel / tau, dim=-1)
        k_mem, v_mem = memory_kv_log(ind.bank.K, ind.bank.V, idx, log_alpha, gates, ind.rope)
        return idx, log_alpha.exp(), k_mem, v_mem

    def choose_dirs(self, backbone, tasks, memory_path: str, cap: bool) -> dict[str, int]:
        """Per task the d whose own projection gives the best leave-one-out answer agreement on
        the task's train examples; -1 when none beats the memory's projection."""
        import torch

        from edgekv.format import Memory
        from edgekv.host.keymodel import KeyModel
        from edgekv.induce.entries import example_keys
        from edgekv.retrieval import effective_keys, fit_projection

        with Memory(memory_path) as m:
            km, proj, counts = KeyModel(backbone.decoder, m.spec.key_layer, m.spec.key_pooling), m.projection, \
                m.per_task_counts()
        out = {}
        for t in tasks:
            with torch.no_grad():
                K = np.asarray(example_keys(backbone, km, list(t.train)))
            answers = np.array([e.answer for e in t.train])
            best, best_d = loo_agreement(np.asarray(self._effective(K, proj)), answers) + 1e-9, -1
            for d in range((counts.get(t.name, 0) // 4 if cap else 8) + 1):
                v = loo_agreement(effective_keys(K, fit_projection(K, d)), answers)
                if v > best + 1e-9:
                    best, best_d = v, d
            out[t.name] = best_d
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="folder holding val-s<seed>/ bench runs with induce's stages")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--policies", default=",".join(POLICIES))
    a = ap.parse_args()

    import torch

    from edgekv.bench.config import BenchConfig
    from edgekv.bench.evaluate import accuracy
    from edgekv.bench.runner import prepare_run
    from edgekv.data.stream import load_stream
    from edgekv.host.models import load_backbone
    from edgekv.induce.evaluate import answer_examples

    torch.set_num_threads(2)
    probe = Probe()
    probe.install()
    res = json.load(open(OUT)) if os.path.exists(OUT) else {"rows": {}}
    res.update(command=" ".join(["benchmarks/probe_route.py", *sys.argv[1:]]), split="val", stream="edge6",
               model="tiny-vlm", budget="8MiB", policies={n: POLICIES[n] for n in a.policies.split(",")})
    bb = load_backbone("tiny-vlm")
    for seed in (int(s) for s in a.seeds.split(",")):
        stream = load_stream("edge6", seed=seed)
        tasks, cfg, _ = prepare_run(bb, stream, replace(BenchConfig(seed=seed), eval_split="val"))
        mem = os.path.join(a.runs, f"val-s{seed}", "stages", "induce", "8388608B", "task05", "state", "memory.ekv")
        for name in a.policies.split(","):
            key = f"s{seed}:{name}"
            if key in res["rows"]:
                continue
            probe.policy = POLICIES[name]
            if probe.policy["kind"] == "tproj":
                probe.dirs = probe.choose_dirs(bb, tasks, mem, probe.policy.get("cap", False))
            t0, per = time.time(), {}
            for t in tasks:
                preds = [x.text for x in answer_examples(bb, list(t.val), memory_path=mem, top_k=4,
                                                         max_new_tokens=cfg.max_new_tokens)]
                per[t.name] = round(100 * accuracy(preds, t.val), 2)
            res["rows"][key] = {"per_task": per, "last": round(float(np.mean(list(per.values()))), 2),
                                "dirs": dict(probe.dirs) if probe.policy["kind"] == "tproj" else None,
                                "seconds": round(time.time() - t0, 1)}
            print(key, json.dumps(res["rows"][key]), flush=True)
            write_json(os.path.basename(OUT), res)


if __name__ == "__main__":
    main()
