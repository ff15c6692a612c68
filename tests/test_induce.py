"""InduceKV on the host: entries, torch induction vs. the numpy runtime path, calibration,
selection and ``edgekv adapt`` — on tiny random models, against plain references and
constructed cases with a known answer. SmolLM2 checks are marked slow."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES

from edgekv.data import Example, write_jsonl
from edgekv.errors import InputError
from edgekv.format import Calibration, Memory
from edgekv.induce.adapt import AdaptConfig, adapt, assign_slots, memory_spec, read_anchors
from edgekv.induce.calibrate import CalibrationConfig, Phi, calibrate
from edgekv.induce.entries import (
    EntryConfig,
    answer_pooling_matrix,
    compute_entries,
    encode_example,
    example_keys,
    key_ids,
    pooling_matrix,
    prefix_kv,
    query_ids,
    raw_keys,
    selection_matrix,
    template_prefix_len,
)
from edgekv.induce.select import SelectionConfig, coverage, keep_top, project_capped_simplex, select
from edgekv.induce.torch_induction import (
    Induction,
    QuerySet,
    alpha_weights,
    apply_rope_t,
    bank_from_entries,
    memory_kv,
    remove_rope_t,
    retrieve,
)
from edgekv.induction import assemble_memory_kv, select_and_weigh
from edgekv.retrieval import effective_keys, fit_projection, topk_exact
from edgekv.rope import RopeSpec, apply_rope, remove_rope

torch.set_num_threads(1)

EXAMPLES = [("code for apple?", "K7"), ("code for river?", "Q2"), ("code for stone?", "Z9"),
            ("what colour is the triangle?", "green"), ("how many dots are there?", "three dots"),
            ("hello world", "this is a tiny tokenizer")]
SMALL = AdaptConfig(entry=EntryConfig(pooled_len=4), selection=SelectionConfig(steps=3, batch_size=4),
                    calibration=CalibrationConfig(steps=2, batch_size=4), top_k=2, anchors_per_task=3,
                    eval_queries=6)


def _examples(tag: str = "t", n: int | None = None) -> list[Example]:
    pairs = EXAMPLES if n is None else [(f"code for {w} {tag}?", f"K{i}") for i, w in
                                        zip(range(n), ["apple", "river", "stone", "fox", "dog", "dots", "world", "blue"] * 4,
                                            strict=False)]
    return [Example(f"{tag}-{i}", p, a) for i, (p, a) in enumerate(pairs)]


def _key_model(bb):
    from edgekv.host.keymodel import KeyModel
    from edgekv.host.models import default_key_layer

    return KeyModel(bb.decoder, default_key_layer(bb.shape.num_layers))


def _bank(bb, cfg: EntryConfig, examples=None):
    examples = examples or _examples()
    entries, encs = compute_entries(bb, examples, _key_model(bb), cfg, "t")
    s = bb.shape
    return entries, encs, bank_from_entries(entries, s.num_layers, s.hidden_size,
                                            (s.num_layers, s.num_kv_heads, cfg.pooled_len, s.head_dim))


# --- RoPE and pooling ----------------------------------------------------------------
def test_torch_rope_equals_numpy_and_inverts_hf_cache(backbone):
    rng = np.random.default_rng(0)
    spec = RopeSpec(tuple(1.0 / 10000 ** (np.arange(0, 12, 2) / 12)), 1.3)  # partial rotary, scaled
    k = rng.normal(size=(2, 3, 9, 16)).astype(np.float32)
    pos = np.arange(5, 14)
    got = apply_rope_t(torch.from_numpy(k), spec, torch.from_numpy(pos)).numpy()
    assert np.abs(got - apply_rope(k, spec, pos)).max() <= 1e-5
    assert np.abs(remove_rope_t(torch.from_numpy(got), spec, torch.from_numpy(pos)).numpy() - k).max() <= 1e-5
    assert np.abs(got - k).max() > 0.1  # control: the rotation does something
    # on a real model: our removal of the cached keys == numpy's
    bb = backbone("llama")
    ids = key_ids(bb.tokenizer, "code for apple is K7, code for river is Q2")
    (K, _), = prefix_kv(bb.model, [ids])
    t = remove_rope_t(K, bb.rope, torch.arange(len(ids))).numpy()
    assert np.abs(t - remove_rope(K.numpy(), bb.rope, np.arange(len(ids)))).max() <= 1e-5


def test_pooling_matrices_known_answers():
    W = pooling_matrix(5, 2)  # bins [0, 3) and [2, 5), as AdaptiveAvgPool1d
    x = torch.arange(5.0)[:, None]
    assert torch.allclose(W @ x, torch.nn.functional.adaptive_avg_pool1d(x.T[None], 2)[0].T)
    S = selection_matrix(9, 4)  # evenly spaced, first and last kept, one-hot rows
    assert S.argmax(1).tolist() == [0, 3, 5, 8] and torch.equal(S.sum(1), torch.ones(4))
    A = answer_pooling_matrix(12, 6, 9)  # 9 question tokens, 3 answer tokens, m = 6
    assert A[3:, 9:].equal(torch.eye(3)) and A[3:, :9].abs().sum() == 0  # answer kept exactly
    assert A[:3].argmax(1).tolist() == [0, 4, 8]  # question: first, middle, last
    L = answer_pooling_matrix(20, 4, 10)  # answer longer than m: question keeps ceil(m/4) = 1
    assert L[0, :10].sum() == 1 and torch.allclose(L[1:, 10:].sum(1), torch.ones(3))


def test_encoded_example_marks_answer_and_template_prefix(backbone):
    bb = backbone("llama")
    tok = bb.tokenizer
    enc = encode_example(tok, "code for apple?", "K7", bb.eos_token_ids)
    q = query_ids(tok, "code for apple?")
    assert list(enc.ids[: enc.answer_start]) == q  # the runtime's query tokens come first
    assert tok.decode(list(enc.ids[enc.answer_start: enc.answer_end - 1])) == "K7"
    assert enc.ids[enc.answer_end - 1] in bb.eos_token_ids
    plen = template_prefix_len(tok)
    assert tok.decode(list(enc.ids[:plen])) == "<|im_start|>user\n"  # the tiny template has no system prompt
    assert enc.content_start == plen


# --- entries against a plain reference ------------------------------------------------
def test_entries_equal_plain_reference(backbone):
    """Key = KeyModel(tokenizer(prompt)); KV = HF cache of the chat conversation, RoPE removed
    in numpy, averaged over plain bins of the tokens after the template prefix."""
    from reference import prefix_kv as ref_prefix_kv

    bb = backbone("llama")
    cfg = EntryConfig(pooled_len=4, pooling="adaptive", payload_dtype="fp16")
    entries, encs, _ = _bank(bb, cfg)
    km = _key_model(bb)
    for ex, e, enc in zip(_examples(), entries, encs, strict=True):
        ids = torch.tensor([key_ids(bb.tokenizer, ex.prompt)])
        with torch.no_grad():
            assert np.abs(km(ids, torch.ones_like(ids))[0].numpy() - e.key).max() <= 1e-5  # batched == alone
        K, V = ref_prefix_kv(bb.model, list(enc.ids))
        K = remove_rope(K, bb.rope, np.arange(len(enc.ids)))[:, :, enc.content_start:]
        V = V[:, :, enc.content_start:]
        T = K.shape[2]
        bins = [(i * T // 4, -(-(i + 1) * T // 4)) for i in range(4)]
        Kp = np.stack([K[:, :, a:b].mean(2) for a, b in bins], 2)
        Vp = np.stack([V[:, :, a:b].mean(2) for a, b in bins], 2)
        tol = 2e-3 * max(1.0, np.abs(Kp).max())  # fp16 payload
        assert np.abs(e.k.astype(np.float32) - Kp).max() <= tol
        assert np.abs(e.v.astype(np.float32) - Vp).max() <= tol
        assert e.source_id == ex.id and e.task == "t"


# --- torch induction == numpy runtime path ------------------------------------------
@pytest.mark.parametrize("payload", ["int8", "fp16", "int4"])
def test_torch_memory_kv_equals_numpy_assemble(backbone, payload):
    bb = backbone("llama")
    entries, _, bank = _bank(bb, EntryConfig(pooled_len=4, payload_dtype=payload))
    proj = fit_projection(bank.raw_keys, 2)
    P = torch.from_numpy(effective_keys(bank.raw_keys, proj))
    gates = np.array([0.9, 0.5, 0.7], np.float32)
    tau = 0.1
    for qi in range(len(entries)):
        q = P[qi: qi + 1]
        idx, sims = retrieve(q, P, torch.zeros(len(bank)), tau, 3)
        alpha = alpha_weights(sims, torch.zeros_like(sims), tau)
        K, V = memory_kv(bank.K, bank.V, idx, alpha, torch.from_numpy(gates), bb.rope)
        top, top_sims = topk_exact(q[0].numpy(), P.numpy(), 3)
        order, al = select_and_weigh(top_sims, tau)
        assert idx[0].tolist() == top[order].tolist()  # same entries, same layout (best last)
        assert np.abs(alpha[0].numpy() - al).max() <= 1e-6
        Kn, Vn = assemble_memory_kv([entries[i] for i in top[order]], al, gates, bb.rope)
        assert np.abs(K[:, 0].numpy() - Kn).max() <= 1e-5 * max(1, np.abs(Kn).max())
        assert np.abs(V[:, 0].numpy() - Vn).max() <= 1e-5 * max(1, np.abs(Vn).max())
    # known answer: uniform weights and unit gates leave entries as computed (scale sqrt(k * 1/k) = 1)
    Ku, Vu = assemble_memory_kv(entries[:3], np.full(3, 1 / 3), np.ones(3), None)
    assert np.allclose(Vu, np.concatenate([bank.V[i].numpy() for i in range(3)], axis=2), atol=1e-6)
    assert np.allclose(Ku, np.concatenate([bank.K[i].numpy() for i in range(3)], axis=2), atol=1e-6)
    # control: other weights give a clearly different cache
    K2, _ = memory_kv(bank.K, bank.V, idx, torch.tensor([[0.8, 0.1, 0.1]]), torch.from_numpy(gates), bb.rope)
    assert np.abs(K2[:, 0].numpy() - Kn).max() > 1e-2


def test_selection_weights_enter_alpha_and_ranking():
    sims = torch.tensor([[0.2, 0.5, 0.9]])
    a1 = alpha_weights(sims, torch.zeros(1, 3), 0.1)
    a2 = alpha_weights(sims, torch.log(torch.tensor([[1.0, 1.0, 0.5]])), 0.1)
    e = torch.exp(sims / 0.1) * torch.tensor([1.0, 1.0, 0.5])
    assert torch.allclose(a2, e / e.sum()) and not torch.allclose(a1, a2)
    P = torch.eye(3)
    q = torch.tensor([[0.2, 0.5, 0.9]])
    idx, _ = retrieve(q, P, torch.log(torch.tensor([1.0, 1.0, 1e-9])), 0.1, 2)
    assert idx[0].tolist() == [0, 1]  # a weight near 0 takes an entry out of the top-k
    ex = torch.tensor([[False, True, False]])
    idx, _ = retrieve(q, P, torch.zeros(3), 0.1, 2, ex)
    assert idx[0].tolist() == [0, 2]  # excluded (own) entry never retrieved; layout best last


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_induction_logits_equal_runtime(family, backbone, exported, tmp_path):
    """adapt writes a memory; the device runtime (ONNX) and the torch induction path retrieve
    the same slots with the same weights and give the same logits (every family the export covers)."""
    from edgekv.induce.adapt import effective, read_bank
    from edgekv.induce.torch_induction import answer_nll, make_cache
    from edgekv.runtime import Runtime

    bb = backbone(family)
    mem = str(tmp_path / "m.ekv")
    spec = memory_spec(bb, SMALL)
    adapt(bb, _examples(), mem, spec.file_bytes_for(4), "t", SMALL)
    prompt = "code for river please?"
    with Memory(mem) as m:
        bank, slots = read_bank(m)
        proj, cal = m.projection, m.calibration
    ind = Induction(bb.model, bank, effective(bank.raw_keys, proj), SMALL.top_k, bb.rope)  # the k tau is fitted for
    km = _key_model(bb)
    q = effective(raw_keys(km, [key_ids(bb.tokenizer, prompt)]), proj)
    idx, alpha, k_mem, v_mem = ind.memory_for(q, None, torch.zeros(len(bank)), torch.tensor(cal.tau),
                                              torch.tensor(cal.gates), leave_one_out=False)
    ids = query_ids(bb.tokenizer, prompt)
    T = k_mem.shape[3]
    with torch.no_grad():
        want = bb.model(input_ids=torch.tensor([ids]), past_key_values=make_cache(k_mem, v_mem, 3),
                        position_ids=torch.arange(T, T + len(ids))[None]).logits[0].numpy()
    with Runtime.load(exported(family), memory=mem) as rt:  # k: the memory's, SMALL.top_k
        assert rt.config.k == SMALL.top_k
        assert rt.prompt_ids(prompt) == ids
        got_ret = rt.retrieve(prompt)
        assert [r.slot for r in got_ret] == [slots[i] for i in idx[0].tolist()]
        assert np.abs(np.array([r.alpha for r in got_ret]) - alpha[0].numpy()).max() <= 1e-5
        got = rt.logits(ids, *rt.memory_kv(got_ret))
    assert np.abs(got - want).max() <= 1e-4
    # the loss path uses the same cache: NLL of an answer through answer_nll matches the logits
    enc = encode_example(bb.tokenizer, prompt, "Q2", bb.eos_token_ids)
    nll = answer_nll(bb.model, [list(enc.ids[: enc.answer_end])], [enc.answer_start], k_mem, v_mem)
    logp = torch.log_softmax(torch.from_numpy(rt_logits_full(bb, k_mem, v_mem, list(enc.ids[: enc.answer_end]))), -1)
    tgt = list(enc.ids[enc.answer_start: enc.answer_end])
    ref = -np.mean([float(logp[enc.answer_start - 1 + i, t]) for i, t in enumerate(tgt)])
    assert abs(float(nll[0]) - ref) <= 1e-4


def rt_logits_full(bb, k_mem, v_mem, ids):
    from edgekv.induce.torch_induction import make_cache

    T = k_mem.shape[3]
    with torch.no_grad():
        return bb.model(input_ids=torch.tensor([ids]), past_key_values=make_cache(k_mem, v_mem, 3),
                        position_ids=torch.arange(T, T + len(ids))[None]).logits[0].numpy()


# --- selection: constructed cases with known answers -----------------------------------
def test_capped_simplex_projection_known_answers():
    w = project_capped_simplex(torch.tensor([0.9, 0.5, 0.1]), 1.0)
    assert torch.allclose(w, torch.tensor([0.7, 0.3, 0.0]), atol=1e-6)
    w = project_capped_simplex(torch.tensor([5.0, 0.0, 0.0]), 1.5)  # cap binds
    assert torch.allclose(w, torch.tensor([1.0, 0.25, 0.25]), atol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = torch.from_numpy(rng.normal(size=12) * 2).float()
        w = project_capped_simplex(v, 5.0)
        assert abs(float(w.sum()) - 5) < 1e-5 and float(w.min()) >= 0 and float(w.max()) <= 1
        # optimality: no feasible pairwise transfer brings w closer to v
        for i, j in [(0, 1), (2, 3), (4, 5)]:
            for d in (1e-3, -1e-3):
                u = w.clone()
                u[i] += d
                u[j] -= d
                if 0 <= float(u[i]) <= 1 and 0 <= float(u[j]) <= 1:
                    assert float((u - v).norm()) >= float((w - v).norm()) - 1e-6


def test_coverage_equals_direct_logdet_both_ways():
    rng = np.random.default_rng(1)
    for n, r in ((5, 8), (9, 4)):
        P = torch.from_numpy(rng.normal(size=(n, r))).float()
        w = torch.from_numpy(rng.uniform(size=n)).float()
        C = (P.double().T * w.double()) @ P.double() + 0.05 * torch.eye(r, dtype=torch.float64)
        want = -float(torch.logdet(C)) + r * np.log(0.05)  # the paper's term without its constant
        assert abs(float(coverage(w, P, 0.05)) - want) <= 1e-4
    assert float(coverage(torch.zeros(3), P[:3], 0.05)) == 0.0


def test_coverage_keeps_one_of_duplicate_candidates():
    """4 copies of direction 0 and directions 1..3 once; 4 slots; no loss signal. The coverage
    term keeps each direction once; without it, the first four (all copies) would stay."""
    d = torch.eye(6)
    P = torch.stack([d[0], d[0], d[0], d[0], d[1], d[2], d[3]])

    def no_loss(w, step):
        return 0.0 * w.sum(), None

    res = select(4, P, no_loss, SelectionConfig(gamma=1.0, steps=40, lr=0.1))
    kept_dirs = sorted(int(P[i].argmax()) for i in res.keep)
    assert kept_dirs == [0, 1, 2, 3]
    assert len(res.keep) == 4 and abs(float(res.w.sum()) - 4) < 1e-4
    control = select(4, P, no_loss, SelectionConfig(gamma=0.0, steps=40, lr=0.1))
    assert sorted(int(P[i].argmax()) for i in control.keep) == [0, 0, 0, 0]


def test_selection_prefers_entries_that_lower_the_loss():
    """Constructed L_cur: the loss falls with the weight of entries 1, 4, 6 (they help the
    current task) and rises with the others; keys are orthogonal (coverage is neutral)."""
    helps = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0], dtype=torch.float32)
    P = torch.eye(8)

    def loss(w, step):
        return 2.0 - (helps * w).sum() + 0.2 * ((1 - helps) * w).sum(), None

    res = select(3, P, loss, SelectionConfig(gamma=0.05, steps=20))
    assert res.keep.tolist() == [1, 4, 6]
    assert res.history[-1]["J"] < res.history[0]["J"]
    assert keep_top(torch.tensor([0.2, 0.9, 0.9, 0.1]), 2).tolist() == [1, 2]


def test_anchors_spread_over_the_keys():
    from edgekv.induce.adapt import spread_rows

    d = np.eye(4, dtype=np.float32)
    P = np.stack([d[0], d[0], d[0], d[1], d[1], d[2], d[3], d[3]])  # 4 items, uneven copies
    for seed in range(5):
        rows = spread_rows(P, 4, seed)
        assert sorted(int(P[r].argmax()) for r in rows) == [0, 1, 2, 3]  # one anchor per item
    assert spread_rows(P, 10, 0) == list(range(8)) and spread_rows(P, 0, 0) == []


def test_budget_is_never_exceeded_and_small_pools_keep_all():
    P = torch.eye(5)
    res = select(8, P, lambda w, s: (w.sum(), None), SelectionConfig())
    assert res.keep.tolist() == [0, 1, 2, 3, 4] and res.history == []
    rng = np.random.default_rng(3)
    for n, b in ((10, 3), (7, 6), (12, 1)):
        P = torch.from_numpy(rng.normal(size=(n, 4))).float()
        c = torch.from_numpy(rng.normal(size=n)).float()
        res = select(b, P, lambda w, s, c=c: ((c * w).sum(), None), SelectionConfig(steps=5))
        assert len(res.keep) == b and float(res.w.max()) <= 1 + 1e-6 and abs(float(res.w.sum()) - b) < 1e-4
    new_slots, clear = assign_slots(6, [0, 2, 3, 5], [0, 3], 3)  # keep old entries 0 and 3 (slots 0, 5)
    assert new_slots == [1, 2, 3] and clear == []
    new_slots, clear = assign_slots(6, [0, 2, 3, 5], [1], 1)
    assert new_slots == [0] and clear == [3, 5]


# --- calibration -----------------------------------------------------------------------
def test_calibration_lowers_current_task_nll(backbone):
    bb = backbone("llama")
    entries, encs, bank = _bank(bb, EntryConfig(pooled_len=4))
    proj = fit_projection(bank.raw_keys, 2)
    P = torch.from_numpy(effective_keys(bank.raw_keys, proj))
    qs = QuerySet(P, [list(e.ids[: e.answer_end]) for e in encs], [e.answer_start for e in encs],
                  [e.source_id for e in entries])
    ind = Induction(bb.model, bank, P, 3, bb.rope)
    phi = Phi.from_calibration(Calibration(0.1, (0.95,) * 3))
    rows = list(range(len(qs)))

    def full_nll(p):
        with torch.no_grad():
            return float(ind.loss(qs, rows, torch.zeros(len(bank)), p.tau(), p.gates()))

    before = full_nll(phi)
    losses = calibrate(phi, lambda p, r: ind.loss(qs, r, torch.zeros(len(bank)), p.tau(), p.gates()),
                       len(qs), CalibrationConfig(steps=15, lr=0.2, batch_size=len(qs)))
    after = full_nll(phi)
    assert after < before - 1e-3, (before, after)
    assert losses[0] == pytest.approx(before, abs=1e-4)
    cal = phi.calibration()
    assert cal.tau > 0 and all(0 < g < 1 for g in cal.gates) and cal.gates != (0.95,) * 3


def test_tau_gradient_is_finite_where_alpha_underflows(backbone):
    """A small tau puts a retrieved entry's alpha below float32 (exactly 0): the entry scale
    sqrt(k * alpha) is taken in log space, so tau's and the gates' gradients stay finite (the sqrt
    of alpha had an infinite derivative there, which the softmax's backward made NaN)."""
    bb = backbone("llama")
    entries, encs, bank = _bank(bb, EntryConfig(pooled_len=4))
    P = torch.from_numpy(effective_keys(bank.raw_keys, fit_projection(bank.raw_keys, 2)))
    qs = QuerySet(P, [list(e.ids[: e.answer_end]) for e in encs], [e.answer_start for e in encs],
                  [e.source_id for e in entries])
    ind = Induction(bb.model, bank, P, 3, bb.rope)
    rows, log_w = list(range(len(qs))), torch.zeros(len(bank))
    tau = torch.tensor(1e-3, requires_grad=True)  # CalibrationConfig.min_tau
    gates = torch.full((3,), 0.5, requires_grad=True)
    _, alpha, k_mem, _ = ind.memory_for(qs.keys, qs.source_ids, log_w, tau, gates)
    assert (alpha == 0).any() and torch.isfinite(k_mem).all()  # the degenerate case is reached
    ind.loss(qs, rows, log_w, tau, gates).backward()
    assert torch.isfinite(tau.grad) and torch.isfinite(gates.grad).all(), (tau.grad, gates.grad)


def test_calibration_refuses_a_non_finite_step():
    """A loss or gradient that is not finite stops the calibration before phi takes it."""
    for loss_fn, phrase in ((lambda p, r: p.tau() * float("nan"), "the answer NLL with memory attached is nan"),
                            (lambda p, r: (p.tau() - p.tau().detach()).sqrt(), "the gradient of tau is not finite")):
        phi = Phi.from_calibration(Calibration(0.1, (0.9,) * 3))
        with pytest.raises(InputError, match=phrase) as err:
            calibrate(phi, loss_fn, 4, CalibrationConfig(steps=3, batch_size=2))
        assert "calibrate step 1 of 3" in str(err.value) and "nothing is committed" in str(err.value)
        assert phi.calibration().tau == pytest.approx(0.1, rel=1e-5)  # phi untouched


def test_phi_round_trips_calibration():
    cal = Calibration(0.07, (0.9, 0.5, 0.2))
    back = Phi.from_calibration(cal).calibration()
    assert back.tau == pytest.approx(0.07, rel=1e-5) and np.allclose(back.gates, cal.gates, atol=1e-6)
    clipped = Phi.from_calibration(Calibration(0.07, (1.0, 0.0, 0.5))).calibration()
    assert np.allclose(clipped.gates, (0.98, 0.02, 0.5), atol=1e-6)  # sigmoid cannot reach 0 or 1


@pytest.mark.parametrize("cls", [EntryConfig, SelectionConfig, CalibrationConfig, AdaptConfig])
def test_configs_round_trip_json(cls):
    cfg = cls()
    data = json.loads(json.dumps(cfg.to_dict(), sort_keys=True))
    assert (AdaptConfig.from_dict(data) if cls is AdaptConfig else cls(**data)) == cfg


def test_config_errors_name_the_field():
    with pytest.raises(InputError, match="EntryConfig.pooling"):
        EntryConfig(pooling="max")
    with pytest.raises(InputError, match="SelectionConfig.eps"):
        SelectionConfig(eps=0)
    with pytest.raises(InputError, match="AdaptConfig.proj_dirs"):
        AdaptConfig(proj_dirs=AdaptConfig().proj_max_dirs + 1)


# --- adapt: the task step and the 5-task run -------------------------------------------
def test_five_task_run_keeps_file_size_and_budget(backbone, tmp_path):
    bb = backbone("llama")
    mem = str(tmp_path / "m.ekv")
    spec = memory_spec(bb, SMALL)
    budget = spec.file_bytes_for(7) + 100  # 7 slots and some slack the file does not use
    sizes, counts = [], []
    for t in range(5):
        s = adapt(bb, _examples(f"task{t}", n=4), mem, budget if t == 0 else None, f"task{t}", SMALL)
        sizes.append(os.path.getsize(mem))
        counts.append(s["per_task_counts"])
        assert s["file_bytes"] == s["file_bytes_on_disk"] == spec.file_bytes_for(7) <= budget
        assert s["num_slots"] == 7 and s["num_used"] == min(7, 4 * (t + 1))
        assert sum(s["per_task_counts"].values()) == s["num_used"]
        assert s["kept_new"] + s["kept_old"] == s["num_used"]
        assert s["anchors"]["count"] == 3 * (t + 1) and s["anchors"]["bytes"] > 0
    assert len(set(sizes)) == 1
    assert counts[0] == {"task0": 4}
    with Memory(mem) as m:
        m.verify()
        assert m.generation == 5 and len(m.projection.dirs) == SMALL.proj_dirs
        assert m.spec.pooled_len == 4 and m.spec.payload_dtype == "int4"  # the default of a new memory
        assert len(m.calibration.gates) == 3
    assert [t for t, _ in read_anchors(mem)] == [f"task{t}" for t in range(5) for _ in range(3)]


def test_adapt_refuses_mismatches(backbone, tmp_path):
    from edgekv.errors import MismatchError

    bb = backbone("llama")
    mem = str(tmp_path / "m.ekv")
    with pytest.raises(InputError, match="pass --budget"):
        adapt(bb, _examples(), mem, None, "t", SMALL)
    budget = memory_spec(bb, SMALL).file_bytes_for(4)
    adapt(bb, _examples(), mem, budget, "t", SMALL)
    with pytest.raises(MismatchError, match="keeps its budget"):
        adapt(bb, _examples(), mem, budget + 1, "t", SMALL)
    with pytest.raises(MismatchError, match="m = 4 positions, EntryConfig.pooled_len says 8"):
        adapt(bb, _examples(), mem, None, "t", AdaptConfig(entry=EntryConfig(pooled_len=8)))
    with pytest.raises(MismatchError, match="stores int4 payloads, EntryConfig.payload_dtype says fp16"):
        adapt(bb, _examples(), mem, None, "t", AdaptConfig(entry=EntryConfig(payload_dtype="fp16")))
    with pytest.raises(MismatchError, match="another model"):
        adapt(backbone("qwen2"), _examples(), mem, None, "t", SMALL)
    # unset entry sizes follow the memory (m = 4, int4), not the new-memory defaults (16, int4)
    s = adapt(bb, _examples(), mem, None, "t", dataclasses.replace(SMALL, entry=EntryConfig()))
    assert s["pooled_len"] == 4 and s["payload_dtype"] == "int4"
    # and an int8 memory stays int8 when the default is int4
    mem8 = str(tmp_path / "m8.ekv")
    adapt(bb, _examples(), mem8, budget, "t", dataclasses.replace(SMALL, entry=EntryConfig(4, payload_dtype="int8")))
    s = adapt(bb, _examples(), mem8, None, "t", dataclasses.replace(SMALL, entry=EntryConfig()))
    assert s["payload_dtype"] == "int8"


def test_a_selector_keeps_exactly_the_rows_it_names(backbone, tmp_path):
    """adapt(selector=...) replaces the bilevel selection only: the rows named are kept (old
    entries in their slots), and the memory is still calibrated and committed with anchors."""
    bb = backbone("llama")
    mem = str(tmp_path / "m.ekv")
    budget = memory_spec(bb, SMALL).file_bytes_for(4)
    calls = []

    def keep_0_1_3(num_slots, old, new):
        calls.append((num_slots, list(old), list(new)))
        return [3, 0, 1]

    s = adapt(bb, _examples("a"), mem, budget, "a", SMALL, selector=keep_0_1_3)
    assert calls == [(4, [], [("a", f"a-{i}") for i in range(len(EXAMPLES))])]
    assert (s["kept_new"], s["selection_steps"], s["num_used"]) == (3, 0, 3)
    assert s["calibration"]["tau"] != pytest.approx(SMALL.init_tau, abs=1e-5) and s["anchors"]["this_task"] == 3
    with Memory(mem) as m:
        before = {int(i): m.read_entry(int(i)).source_id for i in m.occupied()}
    assert sorted(before.values()) == ["a-0", "a-1", "a-3"]
    s = adapt(bb, _examples("b"), mem, None, "b", SMALL, selector=lambda n, old, new: [2, len(old), len(old) + 2])
    assert (s["kept_old"], s["kept_new"], s["dropped_old"]) == (1, 2, 2)
    with Memory(mem) as m:
        after = {int(i): m.read_entry(int(i)).source_id for i in m.occupied()}
    assert sorted(after.values()) == ["a-3", "b-0", "b-2"]
    assert after[[k for k, v in before.items() if v == "a-3"][0]] == "a-3"  # a kept entry stays in its slot
    assert [t for t, _ in read_anchors(mem)] == ["a"] * 3 + ["b"] * 3
    for bad in ([0, 0], [0, 1, 2, 3, 4], [99]):
        with pytest.raises(RuntimeError, match="the selector must keep at most 4 distinct rows"):
            adapt(bb, _examples("c"), mem, None, "c", SMALL, selector=lambda n, old, new, bad=bad: bad)
    with Memory(mem) as m:
        assert {int(i): m.read_entry(int(i)).source_id for i in m.occupied()} == after


def test_entry_config_resolves_against_the_memory():
    from edgekv.errors import MismatchError
    from edgekv.induce.config import resolve_entry_config

    spec = SimpleNamespace(pooled_len=8, payload_dtype="fp16")
    unset = EntryConfig(pooling="adaptive")
    assert unset.pooled_len is None and unset.payload_dtype is None
    assert resolve_entry_config(unset) == EntryConfig(16, "adaptive", payload_dtype="int4")  # a new memory
    assert resolve_entry_config(unset, spec) == EntryConfig(8, "adaptive", payload_dtype="fp16")
    same = EntryConfig(pooled_len=8, payload_dtype="fp16")
    assert resolve_entry_config(same, spec) == same
    with pytest.raises(MismatchError, match=r"m.ekv holds entries of m = 8 positions, EntryConfig.pooled_len says 4"):
        resolve_entry_config(EntryConfig(pooled_len=4), spec, "m.ekv")
    with pytest.raises(MismatchError, match="stores fp16 payloads, EntryConfig.payload_dtype says int8"):
        resolve_entry_config(EntryConfig(payload_dtype="int8"), spec)
    assert EntryConfig.from_dict(unset.to_dict()) == unset  # None survives the JSON round trip


def test_adapt_cli_json(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from edgekv.cli import app

    data = tmp_path / "task-a.jsonl"
    write_jsonl(data, _examples("a"))
    mem = str(tmp_path / "m.ekv")
    runner = CliRunner()
    base = ["adapt", "--model", tiny_model_dir("llama"), "--memory", mem, "--pooled-len", "4",
            "--steps", "2", "-k", "2", "--no-progress"]
    res = runner.invoke(app, base + ["--data", str(data), "--budget", "40KB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("task", "num_used", "num_slots", "file_bytes", "per_task_counts", "J_before", "J_after",
                "calibration", "anchors"):
        assert key in out
    assert out["task"] == "task-a" and out["num_used"] == min(len(EXAMPLES), out["num_slots"])
    assert out["file_bytes"] <= 40_000 and out["per_task_counts"] == {"task-a": out["num_used"]}
    size = os.path.getsize(mem)
    write_jsonl(tmp_path / "b.jsonl", _examples("b"))
    no_m = [a for a in base if a not in ("--pooled-len", "4")]  # m follows the memory
    res = runner.invoke(app, no_m + ["--data", str(tmp_path / "b.jsonl"), "--task", "second"])
    assert res.exit_code == 0, res.output
    assert "entries of second" in res.stdout and os.path.getsize(mem) == size
    for flag, value, phrase in (("--pooled-len", "8", "EntryConfig.pooled_len says 8"),
                                ("--payload", "fp16", "EntryConfig.payload_dtype says fp16")):
        res = runner.invoke(app, no_m + ["--data", str(data), flag, value])
        assert res.exit_code == 5 and phrase in res.output and f"(option {flag})" in res.output, res.output
    res = runner.invoke(app, base + ["--data", str(data), "--budget", "80KB"])
    assert res.exit_code == 5 and "keeps its budget" in res.output and "Traceback" not in res.output
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "prompt": "p"}\n')
    res = runner.invoke(app, base + ["--data", str(tmp_path / "bad.jsonl")])
    assert res.exit_code == 3 and "line 1: field 'answer' is missing" in res.output


def test_third_adapt_with_k2_m4_keeps_a_finite_tau(tiny_model_dir, tmp_path, monkeypatch):
    """Regression: the third ``edgekv adapt`` into a 40KB memory with m = 4, k = 2 drove tau so low
    (about 0.006) that an alpha underflowed to 0 and tau's gradient became NaN ("calibration must
    have a finite tau > 0 ..., got tau nan"). Now every task commits a finite tau; a calibration
    step that is not finite is refused and the memory and its anchors stay byte-identical."""
    import hashlib
    import math
    import sys

    from typer.testing import CliRunner

    import edgekv.induce.calibrate as calibrate_mod
    from edgekv.cli import app

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from crash_harness import write_tasks

    model, runner = tiny_model_dir("llama"), CliRunner()
    tasks = write_tasks(str(tmp_path), 4)
    mem = str(tmp_path / "mem.ekv")

    def run(data: str, *extra: str):
        return runner.invoke(app, ["adapt", "--model", model, "--data", data, "--memory", mem, "--pooled-len", "4",
                                   "-k", "2", "--steps", "2", "--threads", "1", "--no-progress", "--json", *extra])

    for i, data in enumerate(tasks[:3]):
        res = run(data, *(["--budget", "40KB"] if i == 0 else []))
        assert res.exit_code == 0, (i, res.output)
        cal = json.loads(res.stdout)["calibration"]
        assert math.isfinite(cal["tau"]) and cal["tau"] > 0 and all(math.isfinite(g) for g in cal["gates"])
        assert all(math.isfinite(x) for x in cal["final_losses"])

    def digest() -> list[str]:
        return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (mem, mem + ".anchors.jsonl")]

    before = digest()
    nan_loss = calibrate_mod.calibration_loss
    monkeypatch.setattr(calibrate_mod, "calibration_loss", lambda *a, **kw: nan_loss(*a, **kw) * float("nan"))
    res = run(tasks[3])
    assert res.exit_code == 3 and "nothing is committed" in res.output and "Traceback" not in res.output, res.output
    assert digest() == before
    with Memory(mem) as m:
        m.verify()
        assert set(m.per_task_counts()) == {"task1", "task2", "task3"}


# --- SmolLM2 ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_default_key_retrieves_the_right_item(backbone):
    """Default key (mean pooling at default_key_layer, 3 directions removed): precision@3 of
    the right item >= 0.9 when the query is worded unlike every stored example."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from probe_retrieval import FOLDS, precision_at, probe_sets

    bb = backbone("smollm2-135m")
    cfg = AdaptConfig()
    km = _key_model(bb)
    for name, (items, templates) in probe_sets().items():
        prompts = [t.format(x=x) for x in items for t in templates]
        item = np.repeat(np.arange(len(items)), len(templates))
        tmpl = np.tile(np.arange(len(templates)), len(items))
        raw = raw_keys(km, [key_ids(bb.tokenizer, p) for p in prompts])
        precs = []
        for stored_t, _ in FOLDS[:2]:
            st = np.isin(tmpl, stored_t)
            proj = fit_projection(raw[st], cfg.proj_dirs)
            p, _ = precision_at(effective_keys(raw[~st], proj), effective_keys(raw[st], proj), item[~st], item[st], 3)
            precs.append(p)
            if name == "codes":  # control: without the projection, retrieval goes by phrasing
                p0, _ = precision_at(effective_keys(raw[~st], fit_projection(raw[st], 0)),
                                     effective_keys(raw[st], fit_projection(raw[st], 0)), item[~st], item[st], 3)
                assert p0 < 0.7
        assert np.mean(precs) >= 0.9, (name, precs)


@pytest.mark.slow
def test_smollm2_selection_prefers_entries_that_lower_the_loss(backbone, tmp_path):
    """Candidates: for each of 3 words one entry with its true code and one with a wrong code
    (same question, so the keys alone cannot tell them apart). With 3 slots, the bilevel
    selection must keep the true ones: they lower the current-task NLL."""
    bb = backbone("smollm2-135m")
    words, codes, wrong = ["apple", "river", "candle"], ["Q8C", "L9Q", "T4M"], ["Z2K", "B7D", "H3W"]
    # wrong entries first: a selection that did nothing would keep them (ties keep lower indices)
    train = [Example(f"{w}-wrong", f"What is the code for {w}?", c) for w, c in zip(words, wrong, strict=True)]
    train += [Example(f"{w}-true", f"What is the code for {w}?", c) for w, c in zip(words, codes, strict=True)]
    queries = [Example(f"{w}-q{j}", t.format(x=w), c) for w, c in zip(words, codes, strict=True)
               for j, t in enumerate(["Tell me the code assigned to {x}.", "Which code does the word {x} have?"])]
    cfg = AdaptConfig(selection=SelectionConfig(steps=8, batch_size=6, gamma=0.0), top_k=2)
    km = _key_model(bb)
    entries, _ = compute_entries(bb, train, km, cfg.entry, "t")
    s = bb.shape
    bank = bank_from_entries(entries, s.num_layers, s.hidden_size, (s.num_layers, s.num_kv_heads, 16, s.head_dim))
    proj = fit_projection(bank.raw_keys, 0)  # 3 distinct keys: removing directions would erase them
    P = torch.from_numpy(effective_keys(bank.raw_keys, proj))
    from edgekv.induce.adapt import query_set

    qs = query_set(bb, queries, raw_keys(km, [key_ids(bb.tokenizer, q.prompt) for q in queries]), proj, ["t"] * 6)
    ind = Induction(bb.model, bank, P, 2, bb.rope)
    tau, gates = torch.tensor(0.1), torch.full((s.num_layers,), 0.95)
    res = select(3, P, lambda w, step: (ind.loss(qs, range(6), torch.log(w.clamp(min=1e-6)), tau, gates), None),
                 cfg.selection)
    assert sorted(bank.source_ids[i] for i in res.keep) == sorted(e.id for e in train[3:])
    assert res.history[-1]["L_cur"] < res.history[0]["L_cur"]


def test_phrasing_sketch_accumulates_over_tasks_and_enters_the_projection(backbone, tmp_path):
    """With ``phrase_dirs``, each task's same-answer examples add their phrasing scatter to the
    sketch kept beside the memory, and the stored projection removes its top directions (instead of
    the principal ones): the sketch after two tasks is the sum of both tasks' scatters."""
    from edgekv.induce.anchors import read_anchor_set
    from edgekv.retrieval import class_residuals, sketch_dirs

    bb = backbone("llama")
    cfg = dataclasses.replace(SMALL, phrase_dirs=4, proj_max_dirs=8)
    mem = str(tmp_path / "m.ekv")
    km = _key_model(bb)
    scatter = 0.0
    for t in range(2):
        exs = [Example(f"t{t}-{i}", f"{['say', 'name'][i // 4]} {w} {t}?", f"A{i % 4}")  # each word in two phrasings
               for i, w in enumerate(["apple", "river", "stone", "fox"] * 2)]
        adapt(bb, exs, mem, memory_spec(bb, cfg).file_bytes_for(6) if t == 0 else None, f"task{t}", cfg)
        res = class_residuals(example_keys(bb, km, exs), [ex.answer for ex in exs])  # 4 classes of 2
        scatter = scatter + res.T @ res
    sketch = read_anchor_set(mem).phrasing
    assert sketch is not None and sketch.shape[1] == bb.shape.hidden_size
    np.testing.assert_allclose(sketch.T.astype(np.float64) @ sketch, scatter, rtol=1e-3, atol=1e-3 * np.abs(scatter).max())
    with Memory(mem) as m:
        dirs = m.projection.dirs  # [4, R]: the phrasing directions alone (no principal ones beside them)
        assert len(dirs) == 4
        top = sketch_dirs(sketch, 4)
        np.testing.assert_allclose(np.linalg.norm(top @ dirs.T, axis=1), 1.0, atol=1e-4)  # inside the removed span
    # phrase_dirs 0 (the default): no directions beyond the principal ones
    mem0 = str(tmp_path / "m0.ekv")
    adapt(bb, _examples("x", n=4), mem0, memory_spec(bb, SMALL).file_bytes_for(6), "x", SMALL)
    with Memory(mem0) as m:
        assert len(m.projection.dirs) == SMALL.proj_dirs


def test_coverage_sees_all_but_the_top_keys_under_a_phrasing_projection():
    from edgekv.induce.adapt import coverage_keys, effective
    from edgekv.retrieval import fit_projection

    rng = np.random.default_rng(0)
    pool = SimpleNamespace(raw_keys=rng.normal(size=(12, 16)).astype(np.float32))
    P = torch.randn(12, 16)
    cfg = dataclasses.replace(SMALL, phrase_dirs=4)
    assert coverage_keys(pool, P, False, cfg) is P  # no phrasing: the retrieval keys themselves
    want = effective(pool.raw_keys, fit_projection(pool.raw_keys, cfg.proj_dirs))
    torch.testing.assert_close(coverage_keys(pool, P, True, cfg), want)
