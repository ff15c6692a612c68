"""edgekv's own ONNX graphs for Llama-family decoders: fused ops, optional block-wise weights.

Why not optimum's graph: after onnxruntime's optimisations it still runs ~3,100 kernels
per token for SmolLM2-135M (shape arithmetic, ``repeat_kv`` expansion, ``Concat`` of the
whole cache), which costs more than reading the weights once a token is quantised. This
builder writes ~13 kernels per layer with com.microsoft contrib ops:

    h = Gather(embed, ids) [* sqrt(hidden) for Gemma]
    per layer:  x, h = SkipSimplifiedLayerNorm(prev, h)          # residual add + RMSNorm
                q, k, v = Split(MatMul(x, Wqkv) [+ b])            # one fused projection
                q, k = RotaryEmbedding(q | k, position_ids)       # positions are an input
                a, present = GroupQueryAttention(q, k, v, past)   # no repeat_kv, no Concat
                x, h = SkipSimplifiedLayerNorm(MatMul(a, Wo), h)
                prev = MatMul(act(g) * u, Wdown), g, u = Split(MatMul(x, Wgate_up))
    logits = MatMul(norm(h), lm_head)

The interface is optimum's (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{l}.key|value`` -> ``logits``, ``present.{l}.key|value``), so
``ORTModelForCausalLM`` opens the folder and the plain numpy decode loop works. In
addition the past may be a *buffer* longer than the valid length: GroupQueryAttention
reads ``attention_mask``'s length as the valid length, and when ``present`` is bound to
the same memory as ``past`` it appends in place (``runtime.decoder.KVCache``).

Weights (``WeightFormat``): fp32, or weight-only block-wise ``MatMulNBits`` (4 or 8 bits,
asymmetric, one fp32 scale and a zero point per ``block_size`` inputs; activations stay
float, ``accuracy_level`` 4 lets the kernel quantise them per block to int8 for its dot
products). The output layer is always its own matrix (a tied embedding is copied), so a
quantised model never dequantises the embedding per token; the embedding used by Gather
stays fp32 (only the rows of the prompt's tokens are ever read).

The retrieval-key graph (``build_key_graph``) is the same code cut at ``key_layer`` with
mean or last pooling; its initializers have the decoder's names, so one weight file
serves both graphs and the runtime can hand both sessions the same buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekv.errors import InputError

FUSED_FAMILIES = ("llama", "qwen2", "gemma")
MS_DOMAIN = "com.microsoft"
OPSET = 18
KV_BUFFER_META = "edgekv.kv_buffer"  # metadata: "shared" when past may be a longer in-place buffer


@dataclass(frozen=True)
class WeightFormat:
    """How linear weights are stored: fp32 (bits=None) or block-wise MatMulNBits."""

    bits: int | None = None  # None: fp32; 4 or 8: weight-only MatMulNBits
    block_size: int = 32  # inputs per (scale, zero point); power of two >= 16
    accuracy_level: int = 4  # MatMulNBits compute type for A: 4 = int8 (per block), 1 = fp32

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise InputError(f"weight bits must be 4 or 8 (or None for fp32), got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level must be 0..4, got {self.accuracy_level}")

    @property
    def name(self) -> str:
        return "fp32" if self.bits is None else f"int{self.bits}"


@dataclass(frozen=True)
class Arch:
    """The architecture facts the graph needs, read from a Hugging Face causal LM."""

    family: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    activation: str  # "silu" | "gelu_tanh"
    norm_offset: float  # Gemma's RMSNorm scales by (1 + w)
    embed_scale: float  # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float
    max_positions: int

    @staticmethod
    def from_model(model: Any) -> Arch:
        cfg = model.config
        family = str(cfg.model_type)
        if family not in FUSED_FAMILIES:
            raise InputError(f"edgekv's fused decoder graph covers {FUSED_FAMILIES}, not {family!r}")
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        act = str(getattr(cfg, "hidden_activation", None) or cfg.hidden_act) if family == "gemma" else cfg.hidden_act
        if act in ("silu", "swish"):
            activation = "silu"
        elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
            activation = "gelu_tanh"
        else:
            raise InputError(f"activation {act!r} is not supported by the fused decoder graph")
        return Arch(
            family=family, num_layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size), num_heads=heads,
            num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=head_dim,
            intermediate=int(cfg.intermediate_size), vocab=int(cfg.vocab_size), eps=float(cfg.rms_norm_eps),
            activation=activation, norm_offset=1.0 if family == "gemma" else 0.0,
            embed_scale=float(np.float32(cfg.hidden_size ** 0.5)) if family == "gemma" else 1.0,
            attn_scale=head_dim ** -0.5, max_positions=int(cfg.max_position_embeddings))


# --- block-wise weight quantisation ---------------------------------------------------
def quantize_blockwise(w_t: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits tensors of a weight W^T [K, N] (x @ W^T): asymmetric, round to nearest.

    Per output column n and block of ``block_size`` inputs: scale = (max - min) / (2^bits - 1)
    over the block (range widened to include 0), zero point = round(-min / scale).
    -> packed [N, K/block, block*bits/8] uint8, scales [N, K/block] float32,
       zero_points [N, ceil(K/block * bits / 8)] uint8 (onnxruntime's C++ packer).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    w_t = np.ascontiguousarray(w_t, np.float32)
    k, n = w_t.shape
    blocks = -(-k // block_size)
    if blocks * block_size != k:
        w_t = np.pad(w_t, ((0, blocks * block_size - k), (0, 0)))
    per_byte = 8 // bits
    packed = np.zeros((n, blocks, block_size // per_byte), np.uint8)
    zero_points = np.zeros((n, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    quant = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quant(packed, w_t, scales, zero_points, block_size, n, k, False)
    return packed, scales, zero_points


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int,
                         k: int) -> np.ndarray:
    """Reference inverse of :func:`quantize_blockwise` -> W^T [K, N] float32 (for tests)."""
    n, blocks, _ = packed.shape
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        q, zp = packed, zero_points[:, :blocks]
    w = (q.astype(np.float32) - zp[:, :, None]) * scales[:, :, None]  # [N, blocks, block]
    return w.reshape(n, -1)[:, :k].T


# --- graph assembly -----------------------------------------------------------------
class _Graph:
    """Nodes and initializers; names are stable so the decoder and key graph share them."""

    def __init__(self, weights: WeightFormat):
        self.weights = weights
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits[name] = np.ascontiguousarray(value)
        return name

    def op(self, op_type: str, inputs: list[str], num_outputs: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs) -> list[str]:
        from onnx import helper

        self._count += 1
        outs = outputs or [f"/{op_type}_{self._count}/out{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"/{op_type}_{self._count}",
                                           domain=domain, **attrs))
        return outs

    def linear(self, x: str, name: str, w: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ w.T (+ bias); w: [out, in] float32."""
        out_features, in_features = w.shape
        if self.weights.bits is None:
            y = self.op("MatMul", [x, self.const(f"{name}.weight_t", np.asarray(w, np.float32).T)])[0]
        else:
            b, s, zp = quantize_blockwise(np.asarray(w, np.float32).T, self.weights.bits, self.weights.block_size)
            attrs = {"K": in_features, "N": out_features, "bits": self.weights.bits,
                     "block_size": self.weights.block_size}
            if self.weights.accuracy_level:
                attrs["accuracy_level"] = self.weights.accuracy_level
            y = self.op("MatMulNBits", [x, self.const(f"{name}.qweight", b), self.const(f"{name}.scales", s.ravel()),
                                        self.const(f"{name}.zero_points", zp.ravel())], domain=MS_DOMAIN, **attrs)[0]
        if bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias", np.asarray(bias, np.float32))])[0]
        return y


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _layer_weights(layer: Any) -> dict:
    a, m = layer.self_attn, layer.mlp
    bias = [getattr(p, "bias", None) for p in (a.q_proj, a.k_proj, a.v_proj)]
    return {
        "in_norm": _np(layer.input_layernorm.weight), "post_norm": _np(layer.post_attention_layernorm.weight),
        "qkv": np.concatenate([_np(a.q_proj.weight), _np(a.k_proj.weight), _np(a.v_proj.weight)]),
        "qkv_bias": None if bias[0] is None else np.concatenate([_np(b) for b in bias]),
        "o": _np(a.o_proj.weight), "o_bias": None if a.o_proj.bias is None else _np(a.o_proj.bias),
        "gate_up": np.concatenate([_np(m.gate_proj.weight), _np(m.up_proj.weight)]), "down": _np(m.down_proj.weight),
    }


def _rope_caches(g: _Graph, rope: Any, arch: Arch) -> tuple[str, str]:
    """cos, sin [max_positions, rotary_dim/2] with the model's attention scaling folded in."""
    inv = np.asarray(rope.inv_freq, np.float64)
    pos = np.arange(max(arch.max_positions, 1), dtype=np.float64)[:, None]
    ang = pos * inv[None, :]
    scale = float(rope.attention_scaling)
    return (g.const("rope.cos", (np.cos(ang) * scale).astype(np.float32)),
            g.const("rope.sin", (np.sin(ang) * scale).astype(np.float32)))


def _body(g: _Graph, model: Any, arch: Arch, rope: Any, num_layers: int, ids: str, pos: str,
          seqlens: str, total: str, past: list[tuple[str, str]] | None,
          present: list[tuple[str, str]] | None) -> tuple[str, str | None]:
    """Embedding and ``num_layers`` layers. Returns (residual stream h, last MLP output or None)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    embed = g.const("embed_tokens.weight", _np(decoder.embed_tokens.weight))
    h = g.op("Gather", [embed, ids])[0]
    if arch.embed_scale != 1.0:
        h = g.op("Mul", [h, g.const("embed_scale", np.asarray(arch.embed_scale, np.float32))])[0]
    cos, sin = _rope_caches(g, rope, arch)
    rot = {} if 2 * len(rope.inv_freq) == arch.head_dim else {"rotary_embedding_dim": 2 * len(rope.inv_freq)}
    q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    split_qkv = g.const("split.qkv", np.asarray([q_dim, kv_dim, kv_dim], np.int64))
    split_mlp = g.const("split.mlp", np.asarray([arch.intermediate, arch.intermediate], np.int64))
    prev = None
    for i in range(num_layers):
        w = _layer_weights(decoder.layers[i])
        p = f"layers.{i}"
        in_norm = g.const(f"{p}.input_layernorm", w["in_norm"] + arch.norm_offset)
        if prev is None:
            x = g.op("SimplifiedLayerNormalization", [h, in_norm], axis=-1, epsilon=arch.eps, stash_type=1)[0]
        else:
            x, _, _, h = g.op("SkipSimplifiedLayerNormalization", [prev, h, in_norm], 4, MS_DOMAIN, epsilon=arch.eps)
        qkv = g.linear(x, f"{p}.qkv_proj", w["qkv"], w["qkv_bias"])
        q, k, v = g.op("Split", [qkv, split_qkv], 3, axis=-1)
        heads_q = {"num_heads": arch.num_heads, **rot} if rot else {}
        heads_k = {"num_heads": arch.num_kv_heads, **rot} if rot else {}
        q = g.op("RotaryEmbedding", [q, pos, cos, sin], domain=MS_DOMAIN, interleaved=0, **heads_q)[0]
        k = g.op("RotaryEmbedding", [k, pos, cos, sin], domain=MS_DOMAIN, interleaved=0, **heads_k)[0]
        kv_in = ["", ""] if past is None else list(past[i])
        kv_out = present[i] if present is not None else (f"/{p}/present_key", f"/{p}/present_value")
        attn = g.op("GroupQueryAttention", [q, k, v, *kv_in, seqlens, total], domain=MS_DOMAIN,
                    outputs=[f"/{p}/attn", *kv_out], num_heads=arch.num_heads, kv_num_heads=arch.num_kv_heads,
                    scale=float(arch.attn_scale), do_rotary=0)[0]
        o = g.linear(attn, f"{p}.o_proj", w["o"], w["o_bias"])
        post = g.const(f"{p}.post_attention_layernorm", w["post_norm"] + arch.norm_offset)
        x, _, _, h = g.op("SkipSimplifiedLayerNormalization", [o, h, post], 4, MS_DOMAIN, epsilon=arch.eps)
        gu = g.linear(x, f"{p}.gate_up_proj", w["gate_up"])
        gate, up = g.op("Split", [gu, split_mlp], 2, axis=-1)
        if arch.activation == "silu":
            act = g.op("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0)[0]  # x * sigmoid(x)
        else:
            act = g.op("FastGelu", [gate], domain=MS_DOMAIN)[0]  # tanh approximation
        prev = g.linear(g.op("Mul", [act, up])[0], f"{p}.down_proj", w["down"])
    return h, prev


def _seqlens(g: _Graph, mask: str) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k [B] int32 (valid length - 1) and total length (scalar int32)."""
    one = g.const("const.one_i64", np.asarray([1], np.int64))
    valid = g.op("ReduceSum", [mask, one], keepdims=0)[0]
    seqlens = g.op("Cast", [g.op("Sub", [valid, g.const("const.one_scalar_i64", np.asarray(1, np.int64))])[0]],
                   to=6)[0]
    total = g.op("Cast", [g.op("Gather", [g.op("Shape", [mask])[0], g.const("const.idx1", np.asarray(1, np.int64))],
                               axis=0)[0]], to=6)[0]
    return seqlens, total


def _model_proto(g: _Graph, inputs: list, outputs: list, name: str, meta: dict[str, str]) -> Any:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for n, a in g.inits.items()]
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="edgekv")
    model.ir_version = 10
    helper.set_model_props(model, meta)
    return model


def build_decoder_graph(model: Any, rope: Any, weights: WeightFormat) -> Any:
    """The decoder with past as an onnx ModelProto (optimum's input/output names)."""
    from onnx import TensorProto, helper

    arch = Arch.from_model(model)
    g = _Graph(weights)
    L, H, D = arch.num_layers, arch.num_kv_heads, arch.head_dim
    past = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(L)]
    present = [(f"present.{i}.key", f"present.{i}.value") for i in range(L)]
    seqlens, total = _seqlens(g, "attention_mask")
    h, prev = _body(g, model, arch, rope, L, "input_ids", "position_ids", seqlens, total, past, present)
    final = g.const("norm.weight", _np((model.get_decoder() if hasattr(model, "get_decoder") else model.model).norm.weight)
                    + arch.norm_offset)
    if prev is None:  # no layers
        x = g.op("SimplifiedLayerNormalization", [h, final], axis=-1, epsilon=arch.eps, stash_type=1)[0]
    else:
        x = g.op("SkipSimplifiedLayerNormalization", [prev, h, final], 1, MS_DOMAIN, epsilon=arch.eps)[0]
    head = model.get_output_embeddings().weight
    g.linear(x, "lm_head", _np(head))
    g.nodes[-1].output[0] = "logits"
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", arch.vocab])]
    for (pk, pv), (ok, ov) in zip(past, present, strict=True):
        inputs += [helper.make_tensor_value_info(n, f, ["batch_size", H, "past_sequence_length", D]) for n in (pk, pv)]
        outputs += [helper.make_tensor_value_info(n, f, ["batch_size", H, "present_sequence_length", D])
                    for n in (ok, ov)]
    return _model_proto(g, inputs, outputs, "edgekv-decoder",
                        {KV_BUFFER_META: "shared", "edgekv.weights": weights.name})


def build_key_graph(model: Any, rope: Any, key_layer: int, pooling: str, weights: WeightFormat) -> Any:
    """The retrieval-key graph: ``input_ids``, ``attention_mask`` [B, S] (right padding) -> ``pooled`` [B, hidden].

    The first ``key_layer`` layers at positions 0..S-1 (as ``KeyModel``), no final norm,
    then mean over the mask or the last token. Initializer names equal the decoder's.
    """
    from onnx import TensorProto, helper

    arch = Arch.from_model(model)
    if pooling not in ("mean", "last"):
        raise InputError(f"unknown key pooling {pooling!r}")
    g = _Graph(weights)
    seqlens, total = _seqlens(g, "attention_mask")
    shape = g.op("Shape", ["input_ids"])[0]
    seq = g.op("Gather", [shape, g.const("const.idx1", np.asarray(1, np.int64))], axis=0)[0]
    pos = g.op("Range", [g.const("const.zero_scalar_i64", np.asarray(0, np.int64)), seq,
                         g.const("const.one_scalar_i64", np.asarray(1, np.int64))])[0]
    pos = g.op("Expand", [g.op("Unsqueeze", [pos, g.const("const.zero_i64", np.asarray([0], np.int64))])[0], shape])[0]
    h, prev = _body(g, model, arch, rope, key_layer, "input_ids", pos, seqlens, total, None, None)
    if prev is not None:
        h = g.op("Add", [prev, h])[0]  # the residual stream after layer key_layer - 1
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)[0]  # [B, S]
    if pooling == "mean":
        m3 = g.op("Unsqueeze", [mask, g.const("const.two_i64", np.asarray([2], np.int64))])[0]  # [B, S, 1]
        summed = g.op("ReduceSum", [g.op("Mul", [h, m3])[0], g.const("const.one_i64", np.asarray([1], np.int64))],
                      keepdims=0)[0]  # [B, hidden]
        count = g.op("ReduceSum", [m3, g.const("const.one_i64", np.asarray([1], np.int64))], keepdims=0)[0]  # [B, 1]
        count = g.op("Max", [count, g.const("const.one_f32", np.asarray(1.0, np.float32))])[0]
        g.op("Div", [summed, count], outputs=["pooled"])
    else:
        last = g.op("Cast", [seqlens], to=TensorProto.INT64)[0]  # [B] index of the last token
        idx = g.op("Unsqueeze", [last, g.const("const.one_i64", np.asarray([1], np.int64))])[0]  # [B, 1]
        g.op("GatherND", [h, idx], outputs=["pooled"], batch_dims=1)
    i64 = TensorProto.INT64
    inputs = [helper.make_tensor_value_info(n, i64, ["batch_size", "sequence_length"])
              for n in ("input_ids", "attention_mask")]
    outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch_size", arch.hidden])]
    return _model_proto(g, inputs, outputs, "edgekv-key", {"edgekv.weights": weights.name})


def save_graphs(decoder: Any, key: Any, folder: str, decoder_file: str, key_file: str, data_file: str) -> list[str]:
    """Write both graphs with their initializers in one external-data file (each tensor once).

    Tensors are page-aligned in ``data_file`` so onnxruntime can memory-map them; the key
    graph's initializers point at the decoder's bytes (same names, same offsets).
    Returns the written file names.
    """
    import os

    from onnx import TensorProto, numpy_helper, save_model

    offsets: dict[str, tuple[int, int]] = {}
    path = os.path.join(folder, data_file)
    align = 4096
    with open(path, "wb") as f:
        for model in (decoder, key):
            for t in model.graph.initializer:
                if t.name in offsets or len(t.raw_data) < 1024:
                    continue
                pos = f.tell()
                pad = (-pos) % align
                f.write(b"\0" * pad)
                offsets[t.name] = (pos + pad, len(t.raw_data))
                f.write(t.raw_data)
    for model, name in ((decoder, decoder_file), (key, key_file)):
        for t in model.graph.initializer:
            if t.name not in offsets:
                continue
            off, size = offsets[t.name]
            if numpy_helper.to_array(t).nbytes != size:  # same name must mean same bytes
                raise AssertionError(f"initializer {t.name} differs between graphs")
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", data_file), ("offset", str(off)), ("length", str(size))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
        save_model(model, os.path.join(folder, name))
    return [decoder_file, key_file, data_file]


def graph_stats(proto: Any) -> dict:
    """Node count per op type and bytes of initializers (for summaries and benchmarks)."""
    import collections

    return {"nodes": len(proto.graph.node),
            "ops": dict(collections.Counter(n.op_type for n in proto.graph.node).most_common()),
            "initializer_bytes": int(sum(math.prod(t.dims) for t in proto.graph.initializer))}
