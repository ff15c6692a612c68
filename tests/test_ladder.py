"""The accuracy ladder (edgekv.bench.ladder): unpooled float KV is exact, pooling to the entry's
own length is no pooling, int8 stays within quantisation error, retrieval statistics on a
hand-counted case, the markdown's rows and largest drop, and a tiny end-to-end run (text
with a memory file; image+text on a tiny VLM)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from edgekv.bench.ladder import (
    RUNGS,
    LadderConfig,
    example_concept,
    float_kv,
    ladder_markdown,
    largest_drop,
    oracle_past,
    oracle_rows,
    query_logits,
    query_prompt,
    retrieval_stats,
    run_ladder,
    stored_kv,
    write_ladder,
)
from edgekv.data import Example
from edgekv.errors import InputError
from edgekv.induce.config import AdaptConfig


@pytest.fixture(scope="module")
def bb(backbone):
    import torch

    torch.set_num_threads(1)
    return backbone("llama")


def _ecfg(**kw):
    return LadderConfig(**kw).entry_config()


# ---------------------------------------------------------------------------------
# config and concepts
# ---------------------------------------------------------------------------------
def test_config_roundtrip_and_validation():
    for cfg in (LadderConfig(), LadderConfig(top_k=2, tau=0.5, split="val", pooling="adaptive")):
        assert LadderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad, field in (({"top_k": 0}, "top_k"), ({"pooling": "max"}, "pooling"), ({"tau": 0.0}, "tau"),
                       ({"split": "train"}, "split"), ({"payload_dtype": "fp8"}, "payload_dtype"),
                       ({"max_test_per_task": -1}, "max_test_per_task")):
        with pytest.raises(InputError, match=f"LadderConfig.{field}"):
            LadderConfig(**bad)
    with pytest.raises(InputError, match="unknown LadderConfig fields: nope"):
        LadderConfig.from_dict({"nope": 1})
    assert LadderConfig().resolved_tau() == AdaptConfig().init_tau == 0.5


def test_example_concept_rules():
    from edgekv.data.stream import GLORP, HOMES, SHAPE_CODES

    ex = lambda p, a: Example("x", p, a)  # noqa: E731
    assert example_concept({"label_map": SHAPE_CODES}, ex("What is the code word for this shape?", "KELD")) == "square"
    assert example_concept({"label_map": GLORP}, ex("Glorp for 'house'?", "darnu.")) == "house"  # normalised
    # home-city: two people share Quorvik; the person named in the prompt is the concept
    assert example_concept({"label_map": HOMES}, ex("Where does Mira Okonde live?", "Quorvik")) == "Mira Okonde"
    assert example_concept({"label_map": HOMES}, ex("Where does nobody live?", "Quorvik")) == \
        "Mira Okonde|Tomas Brell"
    date = {"label_map": {}, "concepts": {"train": ["format"], "test": ["format"]}}
    assert example_concept(date, ex("Write May 2, 1999 in house format.", "02MAY1999")) == "format"
    assert example_concept({"label_map": {}}, ex("anything", "y")) == "format"  # a format task
    assert example_concept({"label_map": {"a": "X"}}, ex("q", "unknown")) == "unknown"
    rows = oracle_rows(["a", "b", "a", "a", "a", "b"], "a", 3, 0, "t")
    assert len(rows) == 3 and set(rows) <= {0, 2, 3, 4} and rows == oracle_rows(["a", "b", "a", "a", "a", "b"],
                                                                               "a", 3, 0, "t")
    assert oracle_rows(["a", "b", "a"], "b", 3, 0, "t") == [1]  # fewer than k: all of them


# ---------------------------------------------------------------------------------
# the KV rungs
# ---------------------------------------------------------------------------------
EX = Example("e0", "code for apple?", "K7")
QUERY = Example("q0", "code for apple?", "K7")  # the example's own query


def test_rung3_unpooled_float_kv_is_exact(bb):
    """One example's whole KV as the past reproduces a plain forward over [example; query]."""
    import torch

    from edgekv.induce.entries import encode_examples

    ecfg = _ecfg(skip_template_prefix=False)
    full = float_kv(bb, [EX], ecfg)[0]["full"]
    enc = encode_examples(bb, [EX])[0]
    assert full[0].shape[2] == len(enc.ids)  # every token, no pooling
    got = query_logits(bb, QUERY, *oracle_past([full], bb.rope))  # [S, V]
    q_ids = query_prompt(bb, QUERY)[0]
    with torch.no_grad():
        ref = bb.model(input_ids=torch.as_tensor([list(enc.ids) + q_ids])).logits[0, len(enc.ids):]
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-4


def test_rung3_layout_equals_memory_kv_over_entries(bb):
    """Concatenated fixed-length entries are the runtime's layout: memory_kv with uniform alpha."""
    import torch

    from edgekv.induce.torch_induction import memory_kv

    kvs = [d["pooled"] for d in float_kv(bb, [EX, Example("e1", "code for river?", "Q2")], _ecfg(pooled_len=5))]
    k_mem, v_mem = oracle_past(kvs, bb.rope)
    K = torch.as_tensor(np.stack([k for k, _ in kvs]))
    V = torch.as_tensor(np.stack([v for _, v in kvs]))
    k_ref, v_ref = memory_kv(K, V, torch.tensor([[0, 1]]), torch.full((1, 2), 0.5), torch.ones(K.shape[1]), bb.rope)
    assert torch.allclose(k_mem, k_ref, atol=1e-6) and torch.allclose(v_mem, v_ref, atol=1e-6)


@pytest.mark.parametrize("pooling", ["answer", "answer_avg", "adaptive"])
def test_rung4_with_m_equal_to_the_entry_length_is_rung3(bb, pooling):
    """Pooling to m = the number of tokens an entry covers is the identity for every strategy
    (m larger than that repeats or averages tokens, so equality holds at m = length exactly)."""
    T = float_kv(bb, [EX], _ecfg())[0]["full"][0].shape[2]  # tokens after the template's preamble
    d = float_kv(bb, [EX], _ecfg(pooled_len=T, pooling=pooling))[0]
    assert np.array_equal(d["full"][0], d["pooled"][0]) and np.array_equal(d["full"][1], d["pooled"][1])


def test_rung5_int8_within_quantisation_error_of_rung4(bb):
    pooled = float_kv(bb, [EX], _ecfg(pooled_len=6))[0]["pooled"]
    k8, v8 = stored_kv(*pooled, "int8")
    from edgekv.quant import quantize_keys

    _, k_scale = quantize_keys(pooled[0])  # per channel [L, H, D]
    assert np.all(np.abs(k8 - pooled[0]) <= k_scale.astype(np.float32)[:, :, None, :] * 0.5 + 1e-6)
    assert np.abs(v8 - pooled[1]).max() <= np.abs(pooled[1]).max() / 127 * 0.51
    assert not np.array_equal(k8, pooled[0])  # quantisation happened
    a = query_logits(bb, QUERY, *oracle_past([pooled], bb.rope))
    b = query_logits(bb, QUERY, *oracle_past([(k8, v8)], bb.rope))
    diff = float((a - b).abs().max())
    assert 0 < diff < 0.02 * float(a.abs().max())  # a random model's near-tied argmax may still flip


def test_oracle_text_is_prompt_text_with_the_right_examples(bb, tmp_path):
    """Rung 2 builds PromptText's prompt (shots as earlier chat turns, best last) from fixed shots."""
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.ladder import OracleText
    from edgekv.bench.methods import Context, PromptText

    shots = [Example("s1", "code for river?", "Q2"), Example("s0", "code for apple?", "K7")]
    ctx = Context(bb, dataclasses.replace(BenchConfig().quick(), top_k=2), 10**6, str(tmp_path / "w"))
    oracle = OracleText(ctx, {QUERY.id: shots, "other": []})
    ref = PromptText(Context(bb, ctx.cfg, 10**6, str(tmp_path / "w2")))
    ref.items = [("t", ex) for ex in shots]
    ref._retrieve = lambda exs: [[0, 1] for _ in exs]  # the same shots in the same order
    assert oracle.prompt_ids([QUERY]) == ref.prompt_ids([QUERY])
    text = bb.tokenizer.decode(oracle.prompt_ids([QUERY])[0])
    assert text.index("Q2") < text.index("K7") < text.rindex(QUERY.prompt)
    alone = oracle.prompt_ids([Example("other", "hi", "x")])[0]  # no shots: the query alone
    assert bb.tokenizer.decode(alone).count("code for") == 0


# ---------------------------------------------------------------------------------
# retrieval statistics and the report
# ---------------------------------------------------------------------------------
def test_retrieval_stats_hand_counted():
    A, B = ("t1", "a"), ("t1", "b")
    labels = [A, A, B, ("t2", "a"), A, B]  # 3 entries of t1/a; t2/a is another task's concept
    idx = [[3, 0, 1], [2, 4, 0], [0, 1, 3]]
    alpha = [[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]
    st = retrieval_stats(idx, alpha, labels, [A, B, ("t3", "z")], k=3)
    pq = st["per_query"]
    assert pq["precision"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert pq["recall"][:2] == pytest.approx([2 / 3, 1 / 2]) and pq["recall"][2] is None  # none in memory
    assert pq["alpha_right"] == pytest.approx([0.8, 0.1, 0.0])
    assert st["precision"] == pytest.approx(1 / 3) and st["recall"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert st["alpha_right"] == pytest.approx(0.3)


def _fake_result():
    def rung(acc, n=4):
        return {"accuracy": acc, "n": n, "correct": [True] * round(acc * n) + [False] * (n - round(acc * n)),
                "precision": 0.5, "recall": 0.75, "alpha_right": 0.6, "per_query": {}}

    accs = {"alpha": [0.0, 1.0, 1.0, 0.75, 0.25, 0.25], "beta": [0.25, 0.75, 0.5, 0.5, 0.5, 0.75]}
    rungs = list(RUNGS[:6])
    tasks = [{"name": n, "n": 4, "rungs": {r: rung(a) for r, a in zip(rungs, v, strict=True)}} for n, v in accs.items()]
    allr = {r: rung((accs["alpha"][i] + accs["beta"][i]) / 2, 8) for i, r in enumerate(rungs)}
    return {"config": LadderConfig(top_k=4).to_dict(), "rungs": rungs, "tasks": tasks, "all": allr}


def test_markdown_rows_and_largest_drop(tmp_path):
    res = _fake_result()
    md = ladder_markdown(res)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert lines[0].split(" | ")[-1].startswith("largest drop") and "p@4" in lines[0] and "r@4" in lines[0]
    rows = {ln.split(" | ")[0][2:]: ln for ln in lines[1:]}
    assert set(rows) == {"alpha", "beta", "**all**"}  # one row per task, and the total
    assert rows["alpha"].endswith("oracle-kv-pooled → oracle-kv-stored (−50.0) |")  # 75 -> 25
    assert rows["beta"].endswith("oracle-text → oracle-kv-full (−25.0) |")
    assert "| 100.0 |" in rows["alpha"] and "| 50.0 | 75.0 | 60.0 |" in rows["alpha"]
    assert largest_drop({"oracle-text": 0.5, "retrieved": 0.75}, RUNGS) is None
    assert largest_drop({"zero-shot": 0.9, "oracle-text": 0.1}, RUNGS) is None  # zero-shot is no step


# ---------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------
def _tasks():
    from edgekv.data.stream import StreamTask

    def task(name, words):
        label_map = {w: f"K{i}{name[0]}" for i, w in enumerate(words)}
        mk = lambda w, s, j: Example(f"{name}-{s}-{w}{j}", f"code {j} for {w}?", label_map[w])  # noqa: E731
        train = [mk(w, "tr", j) for w in words for j in range(3)]
        test = [mk(w, "te", 9) for w in words]
        return StreamTask(name, "text", "", train, [], test, label_map)

    return [task("apple", ["red", "green"]), task("river", ["blue", "grey"])]


def test_run_ladder_end_to_end_with_a_memory_file(bb, tmp_path):
    from edgekv.bench.config import BenchConfig
    from edgekv.bench.methods import Context, Reservoir

    tasks = _tasks()
    mem = Reservoir(Context(bb, dataclasses.replace(BenchConfig().quick(), pooled_len=4), 60_000, str(tmp_path / "m")))
    for i, t in enumerate(tasks):
        mem.learn(i, t.name, t.train)
    cfg = LadderConfig(top_k=2, pooled_len=4, max_new_tokens=3)
    res = run_ladder(bb, tasks, cfg, memory_path=mem.memory_path, progress=False)
    assert res["rungs"] == list(RUNGS) and res["memory_entries"] == 12
    for t, src in zip(res["tasks"], tasks, strict=True):
        assert t["n"] == 2 and t["concepts"] == list(src.label_map)
        for qid, shots in t["shots"].items():  # k = 2 right examples of the query's concept
            assert len(shots) == 2 and all(s.split("-")[2][:-1] == qid.split("-")[2][:-1] for s in shots)
        for r in RUNGS:
            rec = t["rungs"][r]
            assert rec["n"] == 2 and len(rec["correct"]) == 2 and len(rec["predictions"]) == 2
            assert rec["accuracy"] == pytest.approx(np.mean(rec["correct"]))
        for r in ("retrieved", "memory"):
            rec = t["rungs"][r]
            assert 0 <= rec["precision"] <= 1 and 0 <= rec["recall"] <= 1 and 0 <= rec["alpha_right"] <= 1 + 1e-6
            assert len(rec["per_query"]["precision"]) == 2
    paths = write_ladder(res, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["ladder.json", "ladder.md", "ladder.png"]
    assert json.load(open(paths["json"]))["rungs"] == list(RUNGS)
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["md"]).read()
    assert md.count("| apple |") == 1 and md.count("| river |") == 1


def test_run_ladder_on_image_examples(tmp_path):
    """A tiny random LLaVA: image+text shots through every rung (no memory file)."""
    import torch
    from PIL import Image
    from tiny_vlms import make_tiny_vlm

    from edgekv.data.stream import StreamTask
    from edgekv.host.models import load_backbone

    torch.set_num_threads(1)
    vbb = load_backbone(make_tiny_vlm("llava", str(tmp_path / "model")))
    rng = np.random.default_rng(0)

    def ex(i, split):
        path = str(tmp_path / f"{split}{i}.png")
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(path)
        return Example(f"{split}{i}", "what shape?", ["ZORP", "KELD"][i % 2], path)

    task = StreamTask("shapes", "image", "", [ex(i, "tr") for i in range(4)], [], [ex(i, "te") for i in range(2)],
                      {"circle": "ZORP", "square": "KELD"})
    res = run_ladder(vbb, [task], LadderConfig(top_k=2, pooled_len=4, max_new_tokens=2), progress=False)
    t = res["tasks"][0]
    assert t["concepts"] == ["circle", "square"]
    assert {q: sorted(s) for q, s in t["shots"].items()} == {"te0": ["tr0", "tr2"], "te1": ["tr1", "tr3"]}
    assert all(t["rungs"][r]["n"] == 2 for r in res["rungs"]) and "memory" not in res["rungs"]
