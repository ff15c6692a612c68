"""``edgekv export`` against PyTorch: decoder with past, key graph, int8/int4 weights, manifest, CLI.

Each numeric equivalence comes with a control showing that the check can fail.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from reference import joint_logits, prefix_kv

from edgekv.errors import CorruptFileError, InputError, MismatchError
from edgekv.manifest import MANIFEST_FILE, read_manifest, write_manifest

pytest_plugins = ["conftest_export"]

from tiny_models import FAMILIES  # noqa: E402 - every family the fused graph covers

PREFIX = "code for apple is K7, code for river is Q2"
QUERY = " what is the code for river?"


def _ids(bb, text: str, special: bool = True) -> list[int]:
    return list(bb.tokenizer(text, add_special_tokens=special).input_ids)


def ort_logits(sess, ids: list[int], K=None, V=None, start: int | None = None) -> np.ndarray:
    """Decoder logits [S, V] for ``ids`` after past K, V [L, H, P, D] (positions from ``start``, default P)."""
    names = [i.name for i in sess.get_inputs()]
    num_layers = sum(n.endswith(".key") for n in names)
    shape = next(i.shape for i in sess.get_inputs() if i.name == "past_key_values.0.key")
    if K is None:
        K = V = np.zeros((num_layers, shape[1], 0, shape[3]), np.float32)
    past = K.shape[2]
    start = past if start is None else start
    feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, past + len(ids)), np.int64),
            "position_ids": np.arange(start, start + len(ids), dtype=np.int64)[None]}
    for i in range(num_layers):
        feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(K[i][None], np.float32)
        feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(V[i][None], np.float32)
    return sess.run(["logits"], feed)[0][0]


def _prefix_injection_diffs(bb, sess, prefix: list[int], query: list[int]) -> tuple[float, float]:
    """(max |diff| with the prefix's PyTorch KV as past, same without the past: the control)."""
    K, V = prefix_kv(bb.model, prefix)
    want = joint_logits(bb.model, prefix + query)[len(prefix):]
    got = ort_logits(sess, query, K, V)
    alone = ort_logits(sess, query)
    return float(np.abs(got - want).max()), float(np.abs(alone - want).max())


# --- layout and manifest ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_manifest(family, exported, backbone, ort_session):
    art = exported(family)
    bb = backbone(family)
    m = read_manifest(art)  # verifies every hash
    assert m["model_fingerprint"] == bb.fingerprint and m["model_type"] == family
    # both graphs keep their weights in one file (each tensor once)
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "key.onnx", "tokenizer.json"}
    decoder = dict(m["decoder"])
    tables = decoder.pop("row_tables")
    assert decoder == {"file": "model.onnx", "weights": "fp32", "num_layers": bb.shape.num_layers}
    # the (untied) embedding is only read by row in both graphs: the runtime maps it once for both
    assert set(tables) == {"embed_tokens.weight"}
    assert tables["embed_tokens.weight"]["shape"] == [bb.shape.vocab_size, bb.shape.hidden_size]
    assert m["key"]["layer"] == 1 and m["key"]["pooling"] == "mean"
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"]) == (3, 2, 24 if family == "qwen3" else 16)
    assert m["rope"]["inv_freq"] == pytest.approx(list(bb.rope.inv_freq))
    assert m["tokenizer"]["eos_token_ids"] == [2] and m["tokenizer"]["chat_template"] == bb.tokenizer.chat_template
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(art, name)), name  # optimum's folder layout
    assert not [n for n in os.listdir(art) if n.startswith(".")]  # no staging leftovers
    sess = ort_session(os.path.join(art, "model.onnx"))
    L = bb.shape.num_layers
    inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(L) for kv in ("key", "value")]
    assert [i.name for i in sess.get_inputs()] == inputs
    assert [o.name for o in sess.get_outputs()] == outputs
    with open(os.path.join(art, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == bb.tokenizer.chat_template


def test_flipped_byte_and_missing_file_are_refused(exported, tmp_path):
    art = str(tmp_path / "art")
    shutil.copytree(exported("llama"), art)
    path = os.path.join(art, "model.onnx")

    def flip() -> None:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x01]))

    flip()
    with pytest.raises(MismatchError) as e:
        read_manifest(art)
    assert str(e.value) == "model.onnx does not match manifest.json (hash differs): re-export or restore the file"
    assert read_manifest(art, verify_hashes=False)["decoder"]["file"] == "model.onnx"
    flip()  # restored: verifies again
    assert read_manifest(art)["decoder"]["file"] == "model.onnx"
    os.remove(os.path.join(art, "tokenizer.json"))
    with pytest.raises(InputError, match="tokenizer.json is missing"):
        read_manifest(art)


def test_manifest_module_imports_neither_numpy_nor_torch():
    import subprocess
    import sys

    code = ("import sys, edgekv.manifest; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_manifest_round_trip_and_hostile_manifests(exported, tmp_path):
    data = read_manifest(exported("llama"), verify_hashes=False)
    folder = tmp_path / "m"
    folder.mkdir()
    write_manifest(str(folder), data)
    text = (folder / MANIFEST_FILE).read_text()
    assert json.loads(text) == data and text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert read_manifest(str(folder), verify_hashes=False) == data

    def bad(mutate, match: str, err=CorruptFileError) -> None:
        d = json.loads(text)
        mutate(d)
        (folder / MANIFEST_FILE).write_text(json.dumps(d))
        with pytest.raises(err, match=match):
            read_manifest(str(folder), verify_hashes=False)

    bad(lambda d: d.pop("model_fingerprint"), "'model_fingerprint' is missing")
    bad(lambda d: d.update(manifest_version=2), "manifest_version 2 is not supported")
    bad(lambda d: d.update(num_layers=True), "'num_layers' must be int")
    bad(lambda d: d["key"].update(pooling="max"), "key.pooling")
    bad(lambda d: d["files"].update({"../../etc/passwd": "0" * 64}), "not a plain file name")
    bad(lambda d: d["decoder"].update(file="other.onnx"), "not listed in 'files'")
    bad(lambda d: d["decoder"].update(weights="int3"), "decoder.weights")
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CorruptFileError, match="not a valid edgekv manifest"):
        read_manifest(str(folder))
    (folder / MANIFEST_FILE).write_bytes(b" " * (16 * 2**20 + 1))
    with pytest.raises(CorruptFileError, match="too large"):
        read_manifest(str(folder))
    with pytest.raises(InputError, match="not an edgekv export folder"):
        read_manifest(str(tmp_path))
    with pytest.raises(InputError, match="cannot write manifest"):
        write_manifest(str(folder), {**data, "files": {}})


# --- decoder with past against PyTorch ------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_equal_pytorch(family, exported, backbone, ort_session):
    bb = backbone(family)
    sess = ort_session(os.path.join(exported(family), "model.onnx"))
    ids = _ids(bb, PREFIX + QUERY)
    want = joint_logits(bb.model, ids)
    assert np.abs(ort_logits(sess, ids) - want).max() <= 1e-4
    assert np.abs(ort_logits(sess, ids[1:]) - want[1:]).max() > 1e-2  # control: other tokens, other logits


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_prefix_kv_equals_joint_sequence(family, exported, backbone, ort_session):
    bb = backbone(family)
    sess = ort_session(os.path.join(exported(family), "model.onnx"))
    diff, control = _prefix_injection_diffs(bb, sess, _ids(bb, PREFIX), _ids(bb, QUERY, special=False))
    assert diff <= 1e-4
    assert control > 1e-2  # without the prefix's KV the logits are clearly different


@pytest.mark.parametrize("family", FAMILIES)
def test_position_ids_input_is_honoured(family, exported, backbone, ort_session):
    """The graph uses position_ids (Gemma's optimum config lacks it; edgekv adds it): a query
    placed 150 positions after its past gives PyTorch's logits for the same placement."""
    import torch
    from transformers import DynamicCache

    bb = backbone(family)
    sess = ort_session(os.path.join(exported(family), "model.onnx"))
    prefix, query = _ids(bb, PREFIX), _ids(bb, QUERY, special=False)
    K, V = prefix_kv(bb.model, prefix)
    start = len(prefix) + 150
    cache = DynamicCache()
    for layer in range(K.shape[0]):
        cache.update(torch.from_numpy(K[layer][None]), torch.from_numpy(V[layer][None]), layer)
    with torch.no_grad():
        want = bb.model(input_ids=torch.tensor([query]), past_key_values=cache,
                        position_ids=torch.arange(start, start + len(query))[None]).logits[0].numpy()
    assert np.abs(ort_logits(sess, query, K, V, start=start) - want).max() <= 1e-4
    assert np.abs(ort_logits(sess, query, K, V) - want).max() > 1e-3  # control: positions matter


# --- retrieval-key graph -------------------------------------------------------------
def _key_batch(bb) -> tuple[np.ndarray, np.ndarray]:
    """Two right-padded prompts of different lengths: ids, mask [2, S] int64."""
    rows = [_ids(bb, "code for apple?"), _ids(bb, "the quick brown fox jumps over the lazy dog, twice")]
    S = max(map(len, rows))
    ids = np.full((2, S), 3, np.int64)
    mask = np.zeros((2, S), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    assert mask.min() == 0  # padding is exercised
    return ids, mask


def _keymodel(bb, layer: int, pooling: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    from edgekv.host.keymodel import KeyModel

    with torch.no_grad():
        return KeyModel(bb.decoder, layer, pooling)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_key_graph_equals_keymodel_and_runs_only_its_layers(family, exported, backbone, ort_session):
    import onnx

    bb = backbone(family)
    art = exported(family)
    sess = ort_session(os.path.join(art, "key.onnx"))
    ids, mask = _key_batch(bb)
    (got,) = sess.run(["pooled"], {"input_ids": ids, "attention_mask": mask})
    want = _keymodel(bb, 1, "mean", ids, mask)
    assert got.shape == (2, bb.shape.hidden_size) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - _keymodel(bb, 2, "mean", ids, mask)).max() > 1e-3  # control: another layer differs
    # padding does not leak: the padded row equals the same prompt alone
    short = int(mask[0].sum())
    (alone,) = sess.run(["pooled"], {"input_ids": ids[:1, :short], "attention_mask": mask[:1, :short]})
    assert np.abs(alone[0] - got[0]).max() <= 1e-4
    key, dec = onnx.load(os.path.join(art, "key.onnx")), onnx.load(os.path.join(art, "model.onnx"))
    count = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer)  # noqa: E731
    assert count(key) < count(dec) and len(key.graph.node) < len(dec.graph.node)
    assert count(key) <= (bb.shape.vocab_size + 1) * bb.shape.hidden_size + count(dec) // bb.shape.num_layers


def test_key_graph_last_pooling(backbone, tmp_path):
    from edgekv.export.onnx_export import export_key_graph

    bb = backbone("qwen2")
    path = str(tmp_path / "key.onnx")
    export_key_graph(bb.model, bb.decoder, 2, "last", path)
    import onnxruntime as ort

    ids, mask = _key_batch(bb)
    (got,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        ["pooled"], {"input_ids": ids, "attention_mask": mask})
    assert np.abs(got - _keymodel(bb, 2, "last", ids, mask)).max() <= 1e-4
    assert np.abs(got - _keymodel(bb, 2, "mean", ids, mask)).max() > 1e-3


# --- int8 / int4 weights -------------------------------------------------------------
def _decoder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in ("model.onnx", "model.onnx.data"))


@pytest.mark.parametrize("weights", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_only_decoder_is_smaller_and_close(family, weights, exported, backbone, ort_session):
    """Weight-only MatMulNBits: smaller files, logits close to PyTorch fp32 (tiny random models
    have near-flat logits, so top-1 is a weak signal here; SmolLM2's is in benchmarks/perf_bench.py)."""
    import onnx

    bb = backbone(family)
    fp32, q = exported(family), exported(family, quantize_weights=weights)
    m = read_manifest(q)
    assert m["decoder"]["weights"] == weights
    assert sorted(n for n in os.listdir(q) if n.endswith(".onnx")) == ["key.onnx", "model.onnx"]
    assert not os.path.exists(os.path.join(q, ".fp32"))  # the fp32 original stays out of the folder
    ops = {n.op_type for n in onnx.load(os.path.join(q, "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    size = {d: _decoder_bytes(d) for d in (fp32, q)}
    # tiny models are mostly embedding (kept fp32 for Gather); the layers shrink ~3.5x (int8) / ~5x (int4)
    assert size[q] < (0.75 if weights == "int8" else 0.65) * size[fp32]
    sess = ort_session(os.path.join(q, "model.onnx"))
    ids = _ids(bb, PREFIX + QUERY)
    want = joint_logits(bb.model, ids)
    got = ort_logits(sess, ids)
    diff = float(np.abs(got - want).max())
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    scale = np.abs(want).max()
    print(f"\n{family} {weights}: {size[fp32]} -> {size[q]} bytes, max |logit diff| {diff:.4f}, top-1 {agree:.1%}")
    # tiny gemma2's sandwich norms bring every layer's output to unit scale, where the tiny llama-like
    # models' layers barely move the residual stream: rounding its weights alone (PyTorch on the
    # dequantised weights) moves its logits by 3% (int8) / 30% (int4) of their scale, and the graph
    # stays within 3% / 2% of that rounded model
    bound = (0.03 if weights == "int8" else 0.2) * (2 if family == "gemma2" else 1)
    assert 1e-5 < diff <= bound * scale  # quantised: not identical, but close
    assert agree >= (0.9 if weights == "int8" else 0.6)
    d_inj, _ = _prefix_injection_diffs(bb, sess, _ids(bb, PREFIX), _ids(bb, QUERY, special=False))
    assert d_inj <= bound * scale


def test_int4_a8_takes_int8_activations_in_every_linear(exported, backbone, ort_session):
    """int4-a8: the int4 graph with accuracy_level 4 (int8 activations) in every MatMulNBits, where
    int4 keeps fp32 activations (level 1) in qkv_proj / gate_up_proj; logits as close to PyTorch."""
    import onnx

    def levels(folder: str) -> dict[str, int]:
        g = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=False).graph
        return {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level")
                for n in g.node if n.op_type == "MatMulNBits"}

    bb = backbone("llama")
    a8, int4 = exported("llama", quantize_weights="int4-a8"), exported("llama", quantize_weights="int4")
    assert read_manifest(a8)["decoder"]["weights"] == "int4-a8"
    got_levels, int4_levels = levels(a8), levels(int4)
    assert set(got_levels.values()) == {4} and got_levels.keys() == int4_levels.keys()
    assert 1 in int4_levels.values()  # control: int4 differs exactly there
    ids = _ids(bb, PREFIX + QUERY)
    want = joint_logits(bb.model, ids)
    got = ort_logits(ort_session(os.path.join(a8, "model.onnx")), ids)
    assert 1e-5 < float(np.abs(got - want).max()) <= 0.2 * np.abs(want).max()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_key_graph_shares_the_quantised_weights(weights, exported, backbone, ort_session):
    """key.onnx reads the decoder's (quantised) tensors from the one weights file; its keys stay
    close to KeyModel's fp32 keys (cosine), and clearly away from another layer's."""
    import onnx

    bb = backbone("llama")
    art = exported("llama", quantize_weights=weights)
    key = onnx.load(os.path.join(art, "key.onnx"), load_external_data=False)
    dec = onnx.load(os.path.join(art, "model.onnx"), load_external_data=False)
    where = {t.name: [(e.key, e.value) for e in t.external_data] for t in dec.graph.initializer if t.external_data}
    shared = [t.name for t in key.graph.initializer if t.external_data]
    assert shared and all(where.get(n) == [(e.key, e.value) for e in t.external_data]
                          for n, t in zip(shared, [t for t in key.graph.initializer if t.external_data], strict=True))
    ids, mask = _key_batch(bb)
    (got,) = ort_session(os.path.join(art, "key.onnx")).run(["pooled"], {"input_ids": ids, "attention_mask": mask})
    want = _keymodel(bb, 1, "mean", ids, mask)

    def cos(a, b):
        return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    assert cos(got, want).min() >= (0.999 if weights == "int8" else 0.99)
    assert cos(got, _keymodel(bb, 2, "mean", ids, mask)).max() < cos(got, want).min()  # control


def test_blockwise_quantisation_against_reference():
    """quantize_blockwise round trip within half a step per block (exact for constant blocks);
    the MatMulNBits packing, zero points and the float-offset term reproduce x @ dequantised(W).T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgekv.export.decoder_graph import (
        block_indicator,
        dequantize_blockwise,
        offsets,
        pack_nbits,
        quantize_blockwise,
    )

    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 96)).astype(np.float32)
    w[3, :32] = 0.25  # a constant block
    x = rng.normal(size=(1, 5, 96)).astype(np.float32)
    cases = ((4, "float_offset", None), (4, "integer_zero_point", None), (8, "integer_zero_point", None),
             (8, "symmetric", None), (8, "symmetric", 64))  # the last: scales of blocks of 64, stored per 32
    for bits, mode, scale_block in cases:
        q, s, zp = quantize_blockwise(w, bits, 32, mode, scale_block)
        if scale_block:
            assert np.array_equal(s[:, 0], s[:, 1]) and s.shape == (48, 3)
        deq = dequantize_blockwise(q, s, zp, bits, 96)
        assert np.all(np.abs(deq - w) <= 0.5 * np.repeat(s, 32, axis=1) + 1e-6), mode
        assert np.abs(deq - w).max() > 1e-4  # control: it is quantised
        if mode == "float_offset":
            assert np.array_equal(deq[3, :32], w[3, :32])  # min and max of a block are exact
        ins = ["x", "B", "S"] + (["Z"] if mode == "integer_zero_point" else [])
        inits = [numpy_helper.from_array(pack_nbits(q, bits), "B"), numpy_helper.from_array(s.ravel(), "S")]
        if mode == "integer_zero_point":
            inits.append(numpy_helper.from_array(pack_nbits(zp, bits).ravel(), "Z"))
        nodes = [helper.make_node("MatMulNBits", ins, ["y0"], domain="com.microsoft", K=96, N=48, bits=bits,
                                  block_size=32, accuracy_level=1 if bits == 4 else 4)]
        if mode == "float_offset":
            inits += [numpy_helper.from_array(block_indicator(96, 32), "ind"),
                      numpy_helper.from_array(np.ascontiguousarray(offsets(s, zp, bits).T), "M")]
            nodes += [helper.make_node("MatMul", ["x", "ind"], ["xs"]), helper.make_node("MatMul", ["xs", "M"], ["c"]),
                      helper.make_node("Add", ["y0", "c"], ["y"])]
        else:
            nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
        f = TensorProto.FLOAT
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 5, 96])],
                                  [helper.make_tensor_value_info("y", f, [1, 5, 48])], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = sess.run(["y"], {"x": x})
        ref = x @ deq.T
        tol = 1e-4 if bits == 4 else 0.02 * np.abs(ref).max()  # 8-bit kernels quantise x to int8 per block
        assert np.abs(y - ref).max() <= tol, (bits, mode, scale_block, np.abs(y - ref).max())


# --- tokenizer ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama"])
def test_tokenizer_json_alone_reproduces_hf(family, exported, backbone):
    from tokenizers import Tokenizer

    bb = backbone(family)
    art = exported(family)
    m = read_manifest(art)
    tok = Tokenizer.from_file(os.path.join(art, m["tokenizer"]["file"]))
    for text in ("hello world", "code for river? Q2", " lazy  dog\n"):
        assert tok.encode(text).ids == _ids(bb, text)
    assert m["tokenizer"]["add_bos"] is False and m["tokenizer"]["bos_token_id"] == 1


# --- memory -------------------------------------------------------------------------
def _memory(path: str, bb, fingerprint: str | None = None, key_layer: int = 2, pooling: str = "last") -> None:
    from edgekv.format import Entry, MemorySpec, commit_update, create_memory

    s = bb.shape
    spec = MemorySpec(s.num_layers, s.num_kv_heads, s.head_dim, 2, s.hidden_size, fingerprint or bb.fingerprint,
                      "fp16", bb.rope, key_layer=key_layer, key_pooling=pooling)
    create_memory(path, spec, spec.file_bytes_for(8)).close()
    rng = np.random.default_rng(0)
    kv = np.zeros(spec.payload_shape, np.float16)
    commit_update(path, {i: Entry(rng.normal(size=s.hidden_size).astype(np.float32), kv, kv, task="t")
                         for i in range(5)})


def test_export_with_memory_builds_index_and_uses_its_key(backbone, tmp_path):
    from edgekv.export.pipeline import export_model

    bb = backbone("llama")
    mem = str(tmp_path / "m.ekv")
    _memory(mem, bb)
    out = str(tmp_path / "art")
    summary = export_model(bb.source, out, memory=mem, progress=False)
    m = read_manifest(out)
    assert m["key"]["layer"] == 2 and m["key"]["pooling"] == "last"
    assert summary["key"] == {"layer": 2, "pooling": "last"}
    assert m["index"]["num_items"] == 5 and m["index"]["memory_fingerprint"] == bb.fingerprint
    assert {"index.hnsw", "index.json"} <= set(m["files"])
    import onnxruntime as ort

    ids, mask = _key_batch(bb)
    (got,) = ort.InferenceSession(os.path.join(out, "key.onnx"), providers=["CPUExecutionProvider"]).run(
        ["pooled"], {"input_ids": ids, "attention_mask": mask})
    assert np.abs(got - _keymodel(bb, 2, "last", ids, mask)).max() <= 1e-4


def test_export_with_foreign_memory_or_other_key_layer_is_refused(backbone, tmp_path):
    from edgekv.export.pipeline import export_model

    bb = backbone("llama")
    mem = str(tmp_path / "other.ekv")
    _memory(mem, bb, fingerprint="ab" * 32)
    out = str(tmp_path / "art")
    with pytest.raises(MismatchError, match=r"built for another model \(memory fingerprint abababababab"):
        export_model(bb.source, out, memory=mem, progress=False)
    mine = str(tmp_path / "mine.ekv")
    _memory(mine, bb)
    with pytest.raises(MismatchError, match="ExportOptions.key_layer 1 differs from the key layer 2"):
        export_model(bb.source, out, memory=mine, key_layer=1, progress=False)
    with pytest.raises(InputError, match="ExportOptions.key_layer = 9 is outside the model's layers 0..3"):
        export_model(bb.source, out, key_layer=9, progress=False)
    assert not os.path.exists(out)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no staging left


# --- output folder and failures -----------------------------------------------------
def test_failed_export_leaves_nothing_and_old_export_survives(exported, backbone, tmp_path, monkeypatch):
    import edgekv.export.pipeline as pipeline

    out = tmp_path / "art"
    shutil.copytree(exported("llama"), out)
    before = read_manifest(str(out))

    def boom(*a, **k):
        raise RuntimeError("simulated failure in the tokenizer stage")

    from edgekv.export import common

    monkeypatch.setattr(common, "export_tokenizer", boom)  # the tokenizer stage both exports share
    with pytest.raises(RuntimeError, match="simulated"):
        pipeline.export_model(backbone("qwen2").source, str(out), progress=False)
    assert read_manifest(str(out)) == before  # the old export is untouched
    assert sorted(os.listdir(tmp_path)) == ["art"]  # no staging folder left
    with pytest.raises(RuntimeError):
        pipeline.export_model(backbone("qwen2").source, str(tmp_path / "new"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["art"]


def test_cli_export_json_errors_and_determinism(exported, tiny_model_dir, tmp_path):
    from transformers import GPT2Config
    from typer.testing import CliRunner

    from edgekv.cli import app

    runner = CliRunner()
    out = str(tmp_path / "art")
    res = runner.invoke(app, ["export", "--model", tiny_model_dir("llama"), "--out", out, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["out"] == out and data["decoder"]["weights"] == "fp32" and data["files"]["model.onnx"] > 0
    assert data["decoder"]["fp32_check"]["max_abs_diff_with_past"] <= 1e-4
    # deterministic: an export in another process-state gives the same bytes
    assert read_manifest(out)["files"] == read_manifest(exported("llama"))["files"]
    res = runner.invoke(app, ["export", "--model", tiny_model_dir("llama"), "--out", out])  # replacing an export is fine
    assert res.exit_code == 0 and "model fingerprint" in res.stdout and "model.onnx" in res.stdout

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100).save_pretrained(gpt2)
    res = runner.invoke(app, ["export", "--model", str(gpt2), "--out", str(tmp_path / "g")])
    assert res.exit_code == 3 and "architecture 'gpt2' is not supported" in res.stderr
    assert "Traceback" not in res.output and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 3 and "not found" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["export", "--model", tiny_model_dir("llama"), "--out", str(gpt2)])
    assert res.exit_code == 3 and "set ExportOptions.force to replace it (option --force)" in res.stderr
    res = runner.invoke(app, ["export", "--model", tiny_model_dir("llama"), "--out", out, "--quantize-weights", "int3"])
    assert res.exit_code == 3 and "--quantize-weights" in res.stderr
    assert not os.path.exists(tmp_path / "g") and not os.path.exists(tmp_path / "x")


def test_ort_model_for_causal_lm_opens_the_folder(exported):
    pytest.importorskip("optimum.onnxruntime")
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(exported("llama"), use_cache=True)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


# --- the built-in SmolLM2-135M --------------------------------------------------------
@pytest.mark.slow
def test_smollm2_injected_prefix_kv_equals_joint_sequence(smollm2_export, backbone, ort_session):
    bb = backbone("smollm2-135m")
    m = read_manifest(smollm2_export)
    assert m["model_fingerprint"] == bb.fingerprint and m["num_layers"] == 30 and m["tokenizer"]["add_bos"] is True
    sess = ort_session(os.path.join(smollm2_export, "model.onnx"))
    prefix = _ids(bb, "The secret code for the red door is 4417. The blue door opens with 2231.")
    query = _ids(bb, " Question: what is the code for the red door? Answer:", special=False)
    diff, control = _prefix_injection_diffs(bb, sess, prefix, query)
    print(f"\nsmollm2 prefix injection: max |logit diff| {diff:.2e} (control {control:.2f})")
    assert diff <= 1e-4
    assert control > 1e-1


def test_sliding_window_caps_the_context():
    from edgekv.modelshape import ModelShape

    base = {"model_type": "mistral", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
            "max_position_embeddings": 512}
    assert ModelShape.from_config({**base, "sliding_window": 256}).max_positions == 256
    assert ModelShape.from_config({**base, "sliding_window": None}).max_positions == 512
    assert ModelShape.from_config({**base, "sliding_window": 4096}).max_positions == 512
    # qwen2 / qwen3 carry a window they do not use
    assert ModelShape.from_config({**base, "sliding_window": 256, "use_sliding_window": False}).max_positions == 512
    # gemma2 applies its window (GroupQueryAttention's local_window_size): the context stays the model's
    assert ModelShape.from_config({**base, "model_type": "gemma2", "sliding_window": 256}).max_positions == 512


def test_mistral_export_refuses_what_the_window_cannot_hold(exported):
    from edgekv.manifest import read_manifest
    from edgekv.runtime import Runtime

    art = exported("mistral")
    assert read_manifest(art)["max_positions"] == 256  # the tiny mistral's window, not its 512 positions
    with Runtime.load(art, k=0) as rt, pytest.raises(InputError, match="exceeds the model's context of 256"):
        rt.generate("apple river " * 200, max_new_tokens=2)


def _full_prefix_kv(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """K, V [L, H, T, D] of ids at 0..T-1, every position of every layer (a plain DynamicCache:
    the model's own drops what its windowed layers no longer see)."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), use_cache=True).past_key_values
    return (np.stack([layer.keys[0].numpy() for layer in cache.layers]),
            np.stack([layer.values[0].numpy() for layer in cache.layers]))


def test_gemma2_window_is_applied_past_it_with_injected_memory(tmp_path, ort_session):
    """A tiny gemma2 whose alternate layers see the last 6 positions: the export equals PyTorch on a
    text 3x longer than the window, with the first half injected as past, and greedy generation after
    position-free memory matches transformers' own (windowed) decoding; the context is not capped."""
    import torch
    from reference import greedy
    from tiny_models import save_random_model, tiny_config, train_tokenizer
    from transformers import AutoModelForCausalLM

    from edgekv.export.pipeline import export_model
    from edgekv.host.models import load_backbone
    from edgekv.induce.entries import prefix_kv as adapt_prefix_kv
    from edgekv.rope import remove_rope
    from edgekv.runtime import Runtime

    tok = train_tokenizer()
    cfg = tiny_config("gemma2", len(tok))
    cfg.sliding_window = 6
    torch.manual_seed(0)
    folder = save_random_model(AutoModelForCausalLM.from_config(cfg), tok, str(tmp_path / "gemma2-w6"))
    bb = load_backbone(folder)
    art = export_model(folder, str(tmp_path / "art"), progress=False)["out"]
    assert read_manifest(art)["max_positions"] == 512  # not the window
    sess = ort_session(os.path.join(art, "model.onnx"))
    ids = _ids(bb, PREFIX + QUERY)
    assert len(ids) > 3 * 6
    want = joint_logits(bb.model, ids)
    assert np.abs(ort_logits(sess, ids) - want).max() <= 1e-4
    split = len(ids) // 2
    K, V = _full_prefix_kv(bb.model, ids[:split])
    assert np.abs(ort_logits(sess, ids[split:], K, V) - want[split:]).max() <= 1e-4
    with torch.no_grad():  # control: the same model attending to everything
        bb.model.config.sliding_window = 512
        full = joint_logits(bb.model, ids)
        bb.model.config.sliding_window = 6
    assert np.abs(full - want).max() > 1e-2
    # adapt's prefix KV keeps every position of the windowed layers too
    Ka, Va = adapt_prefix_kv(bb.model, [ids[:split]])[0]
    assert np.abs(Ka.numpy() - K).max() <= 1e-5 and np.abs(Va.numpy() - V).max() <= 1e-5
    prompt = "what is the code for river?"
    with Runtime.load(art, k=0) as rt:
        query = rt.prompt_ids(prompt)
        res = rt.generate(prompt, max_new_tokens=12, inject=(remove_rope(K, bb.rope, np.arange(split)), V))
    expect = greedy(bb.model, ids[:split] + query, 12, set(bb.eos_token_ids))
    assert res.token_ids == expect and len(expect) > 0
