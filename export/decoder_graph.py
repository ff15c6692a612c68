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
                x, h = SkipSimplifiedLayerNorm(MatMul(a, Wo) [-> norm, Gemma 2], h)
                prev = MatMul(act(g) * u, Wdown) [-> norm, Gemma 2], g, u = Split(MatMul(x, Wgate_up))
    logits = MatMul(norm(h), lm_head) [-> cap * tanh(logits / cap), Gemma 2]

Gemma 2 (``gemma2``), exactly with stock ops: the sandwich norms are two more RMSNorms per layer
(post_attention_layernorm on the attention output, post_feedforward_layernorm on the MLP's;
pre_feedforward_layernorm takes the place of the others' post_attention_layernorm); attention
soft-capping and ``query_pre_attn_scalar`` are GroupQueryAttention's ``softcap`` (applied to the
scaled logits before the mask, as transformers' eager attention) and ``scale``; the final
soft-capping is Div, Tanh, Mul; the window of the ``sliding_attention`` layers is
GroupQueryAttention's ``local_window_size`` (``attention_attrs``), so its context is not capped.
The host loads it with eager attention (transformers' SDPA path drops the soft-cap).

Gemma 3 (``gemma3_text``) is not fused, and not exported through optimum either: its graph needs
only stock ops (RotaryEmbedding takes cos/sin caches as inputs, so the sliding layers could read a
second cache built from ``rope_local_base_freq``; q/k norms are qwen3's ``_head_norm`` with Gemma's
(1 + w)), but the memory cannot hold it exactly. edgekv stores memory keys position-free and the
runtime rotates them into the positions it assigns with *one* RoPE for every layer (a memory
file's header holds one set of inverse frequencies; ``runtime.decoder.KVCache.write_entries``
builds one cos/sin table), while Gemma 3 rotates its sliding layers' keys with base 10,000 and its
global layers' with 1,000,000 (and linear scaling from 4B up). An entry's keys would come out of
the round trip rotated by the wrong angles in one group of layers (``edgekv.host.models.
check_rotary_decoder`` measures this and refuses the model). Covering it needs a per-layer RoPE in
the memory format and the runtime, not another graph.

The interface is optimum's (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{l}.key|value`` -> ``logits``, ``present.{l}.key|value``), so
``ORTModelForCausalLM`` opens the folder and the plain numpy decode loop works. In
addition the past may be a *buffer* longer than the valid length: GroupQueryAttention
reads ``attention_mask``'s length as the valid length, and when ``present`` is bound to
the same memory as ``past`` it appends in place (``runtime.decoder.KVCache``).

Weights (``WeightFormat``): fp32, or weight-only block-wise ``MatMulNBits`` at 4 or 8 bits
(activations stay float; per-linear choices and the measurements behind them are in
``WeightFormat``'s docstring). The output layer is always its own matrix (a tied
embedding is copied and quantised separately), so nothing is dequantised per token
outside the kernels; the quantised embedding table is read by ``GatherBlockQuantized``.
In fp32 a tied output layer reads the embedding table itself (``FusedMatMul`` transB).

The retrieval-key graph (``build_key_graph``) is the same code cut at ``key_layer`` with
mean or last pooling; its initializers have the decoder's names, so one weight file
serves both graphs (a quantised export's retrieval key reads the quantised weights).

Activation smoothing (``WeightFormat.smooth_alpha``, the int8 format): SmoothQuant's
per-input-channel scales s, folded into the weights before quantisation (no extra ops):
x / s goes into the producer of x (the RMSNorm scale for ``qkv_proj`` / ``gate_up_proj``,
the ``up`` rows for ``down_proj``), W * s into the linear's columns. The float model is
unchanged; the int8 activation blocks of ``MatMulNBits`` lose their outlier channels. The
activation maxima come from a PyTorch pass over ``CALIBRATION_TEXTS`` at export time
(``calibrate_activations``), computed once and given to both graphs so their weights stay
one set. ``o_proj`` is not smoothed: its input's producer is V, which is also the KV cache
the runtime injects memory into (V / s there would put injected values in another basis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekv.errors import InputError
from edgekv.modelshape import FUSED_FAMILIES, WINDOWED_FAMILIES, ModelShape

# FUSED_FAMILIES (edgekv.modelshape, which the host side shares): llama's layer with qwen2 q/k/v
# biases; gemma (1 + w) norms, scaled embeddings, tanh GELU; mistral a sliding window (the context
# is capped at it: ModelShape.from_config); qwen3 per-head RMSNorm of q and k before RoPE; phi3 fused
# qkv_proj / gate_up_proj and partial rotary; gemma2 gemma's plus sandwich norms, soft-capping,
# query_pre_attn_scalar and a sliding window on alternate layers (see the module docstring)
GEMMA_FAMILIES = ("gemma", "gemma2")  # (1 + w) RMSNorm scales, embeddings * sqrt(hidden), hidden_activation
MS_DOMAIN = "com.microsoft"
OPSET = 18
KV_BUFFER_META = "edgekv.kv_buffer"  # metadata: "shared" when past may be a longer in-place buffer
LOGITS_TO_KEEP = "logits_to_keep"  # optional decoder input: logits of the last N positions (0 = all)


@dataclass(frozen=True)
class WeightFormat:
    """How linear weights are stored: fp32 (``bits`` None) or weight-only ``MatMulNBits``.

    Measured on SmolLM2-135M (docs/performance.md), whose weights are llama.cpp Q4_1 blocks
    of 32 and whose tied embedding is Q8_0:
    * 4-bit decoder-layer linears: "float_offset" blocks (Q4_1 arithmetic: exact for such a
      model). onnxruntime's fast kernels take only integer zero points, so the float offset
      is added as blocksum(x) @ offsets (3 small ops); integer zero points cost top-1
      agreement (0.67 instead of 1.0 with fp32 activations);
    * 8-bit decoder-layer linears: "integer_zero_point" (8-bit leaves room; no extra ops);
    * the output layer: symmetric 8-bit (Q8_0) in blocks of ``head_block_size`` (16) with the
      scales of blocks of 32 (exact for a Q8_0 model; the finer blocks only refine the int8
      activations: top-1 0.969 -> 0.973 over plain blocks of 16, 0.971 -> 0.981 over 32 on the
      308-token set), never 4-bit (top-1 0.87); the embedding table too (its own copy,
      ``GatherBlockQuantized``; only the prompt's rows are read, from the mapped weights file);
    * ``accuracy_level`` 4 (the kernel quantises activations per block to int8) except the
      4-bit ``fp32_inputs`` linears, fed by RMSNorm outputs with outlier channels: int8
      activations there cost ~2-3 points of top-1 each. At 8 bits fp32 activations run
      onnxruntime's ~100x slower reference path, so 8-bit always uses int8 activations;
    * ``smooth_alpha`` (8-bit): SmoothQuant scales max|x_j|^a / max_i|W_ij|^(1-a) folded into
      ``qkv_proj``, ``gate_up_proj`` and ``down_proj`` (see the module docstring). int8 top-1
      on the 668-token set 0.951 -> 0.973 at a = 0.6, mean KL to fp32 0.0050 -> 0.0022 (on 741
      other tokens 0.933 -> 0.966, KL 0.0053 -> 0.0023). a = 0.3 / 0.4 / 0.5 / 0.7 / 0.8 give
      top-1 0.951 / 0.975 / 0.975 / 0.970 / 0.970; 0.6-0.7 have the lowest KL on both sets and
      0.6 varies least with the calibration texts. Top-1 moves by about +-1 point with them
      (near-ties); KL does not. Smoothing ``o_proj`` (via V) or the output layer as well does
      not help. Off for 4-bit, whose weights are exact Q4_1 blocks smoothing would break.
    """

    bits: int | None = None  # None: fp32; 4 or 8
    block_size: int = 32  # inputs per scale (and offset) of decoder-layer linears
    head_block_size: int = 16  # lm_head: finer int8 activation blocks; scales from blocks of 32 (Q8_0's)
    embed_block_size: int = 32  # the embedding table: symmetric 8-bit rows for GatherBlockQuantized
    fp32_inputs: frozenset[str] = frozenset({"qkv_proj", "gate_up_proj"})  # 4-bit: fp32 activations
    # 4-bit: float offsets (Q4_1, exact; 3 small ops per linear) or integer zero points (no
    # extra ops: onnxruntime's fastest 4-bit kernels, top-1 ~0.6-0.7 on SmolLM2; the benchmark's
    # kernel ceiling, not a shipped format)
    float_offsets: bool = True
    smooth_alpha: float | None = None  # SmoothQuant migration strength in [0, 1]; None: no smoothing

    def __post_init__(self) -> None:
        if self.bits not in (None, 4, 8):
            raise InputError(f"weight bits must be 4 or 8 (or None for fp32), got {self.bits}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise InputError(f"smooth_alpha must be in [0, 1] (or None for no smoothing), got {self.smooth_alpha}")
        for name in ("block_size", "head_block_size", "embed_block_size"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise InputError(f"{name} must be a power of two >= 16, got {v}")

    @property
    def name(self) -> str:
        if self.bits == 4 and not self.fp32_inputs:
            return "int4-a8"
        return "fp32" if self.bits is None else f"int{self.bits}"

    def layout(self, kind: str) -> tuple[int, int, str, int | None]:
        """(bits, block size, quantize_blockwise mode, scale block) of a linear of this kind."""
        if kind == "lm_head":
            return 8, self.head_block_size, "symmetric", max(self.head_block_size, 32)
        offset = self.bits == 4 and self.float_offsets
        return self.bits, self.block_size, "float_offset" if offset else "integer_zero_point", None

    def accuracy_level(self, kind: str, bits: int) -> int:
        """MatMulNBits accuracy_level: 1 = fp32 activations, 4 = int8 activations per block."""
        return 1 if bits == 4 and kind in self.fp32_inputs else 4


# "int4-a8": int4 with int8 activations in every linear (llama.cpp's Q4_1 arithmetic). On SmolLM2-135M
# (benchmarks/perf_bench.py, one run): 11.2 ms/token against int4's 16.8 and llama.cpp Q4_1's 10.7, top-1
# vs PyTorch fp32 0.961 (= llama.cpp Q4_1's) against int4's 0.970. Opt-in: int4 keeps the accuracy.
WEIGHT_FORMATS = {"fp32": WeightFormat(), "int8": WeightFormat(8, smooth_alpha=0.6), "int4": WeightFormat(4),
                  "int4-a8": WeightFormat(4, fp32_inputs=frozenset())}


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
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k (weights [head_dim]) before RoPE
    attn_softcap: float = 0.0  # gemma2: attention logits -> cap * tanh(logits / cap) (0: none)
    final_softcap: float = 0.0  # gemma2: output logits -> cap * tanh(logits / cap) (0: none)
    windows: tuple[int, ...] = ()  # per layer: the sliding window in tokens, 0 full attention (): all full

    @staticmethod
    def from_model(model: Any) -> Arch:
        cfg = model.config
        family = str(cfg.model_type)
        if family not in FUSED_FAMILIES:
            raise InputError(f"edgekv's fused decoder graph covers {FUSED_FAMILIES}, not {family!r}")
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        gemma = family in GEMMA_FAMILIES
        act = str(getattr(cfg, "hidden_activation", None) or cfg.hidden_act) if gemma else cfg.hidden_act
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
            activation=activation, norm_offset=1.0 if gemma else 0.0,
            embed_scale=float(np.float32(cfg.hidden_size ** 0.5)) if gemma else 1.0,
            attn_scale=float(getattr(cfg, "query_pre_attn_scalar", None) or head_dim) ** -0.5,
            max_positions=ModelShape.from_config(cfg.to_dict()).max_positions, qk_norm=family == "qwen3",
            attn_softcap=float(getattr(cfg, "attn_logit_softcapping", None) or 0.0),
            final_softcap=float(getattr(cfg, "final_logit_softcapping", None) or 0.0),
            windows=layer_windows(cfg.to_dict()))


def layer_windows(cfg: dict) -> tuple[int, ...]:
    """Each layer's sliding window in tokens (0: full attention) for ``WINDOWED_FAMILIES``, whose
    ``layer_types`` name the windowed layers; () for the others (no window, or one the context is
    capped at: ``edgekv.modelshape.context_positions``)."""
    if cfg.get("model_type") not in WINDOWED_FAMILIES or not cfg.get("sliding_window"):
        return ()
    return tuple(int(cfg["sliding_window"]) if t == "sliding_attention" else 0 for t in cfg["layer_types"])


def attention_attrs(arch: Arch, layer: int) -> dict:
    """GroupQueryAttention's attributes for ``layer``: heads, scale, soft-capping, window.

    A window of W: query i sees cache positions i - W + 1 .. i, in transformers (kv > q - W) and in
    GroupQueryAttention with local_window_size = W (measured: W - 1 and W + 1 differ from PyTorch).
    Positions are cache indices in both, and the runtime's memory sits at 0..T-1, so a windowed
    layer sees injected entries exactly as the joint sequence's tokens."""
    attrs = {"num_heads": arch.num_heads, "kv_num_heads": arch.num_kv_heads, "scale": float(arch.attn_scale)}
    if arch.attn_softcap:
        attrs["softcap"] = float(arch.attn_softcap)  # cap * tanh(scale * q.k / cap), before the mask
    window = arch.windows[layer] if arch.windows else 0
    if window:
        attrs["local_window_size"] = window
    return attrs


# --- block-wise weight quantisation ---------------------------------------------------
MODES = ("symmetric", "float_offset", "integer_zero_point")


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """w [N, K] -> [N, K/block, block] float32 (K zero-padded to a whole block)."""
    w = np.asarray(w, np.float32)
    n, k = w.shape
    blocks = -(-k // block_size)
    return np.pad(w, ((0, 0), (0, blocks * block_size - k))).reshape(n, blocks, block_size)


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, mode: str, scale_block: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round-to-nearest block-wise quantisation of a linear weight w [N out, K in].

    Blocks run along K (the inputs of one output), ``block_size`` long; w ~ (q - zp) * scale.
    * "symmetric" (llama.cpp's Q8_0): scale = absmax / (2^(bits-1) - 1), zp = 2^(bits-1) implied;
      ``scale_block`` (a multiple of ``block_size``) takes the absmax over that larger block and
      repeats it: blocks of 16 with Q8_0's scales of 32 keep a Q8_0 model exact;
    * "float_offset" (Q4_1 / Q8_1): scale = (max - min) / (2^bits - 1), zp = -min / scale as a
      float, so the block's min and max (and a Q4_1 model's whole grid) are exact;
    * "integer_zero_point" (what MatMulNBits' fast kernels take): range widened to hold 0,
      zp = round(-min / scale) in 0..2^bits - 1.
    -> q [N, K/block, block] uint8 (unpacked), scales [N, K/block] float32,
       zp [N, K/block] (None | float32 | uint8)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scale_block = scale_block or block_size
    if scale_block % block_size:
        raise ValueError(f"scale_block {scale_block} must be a multiple of block_size {block_size}")
    wb = _blocks(w, block_size)
    top, half = (1 << bits) - 1, 1 << (bits - 1)
    if mode == "symmetric":
        scale = np.abs(_blocks(w, scale_block)).max(axis=2) / (half - 1)  # [N, K/scale_block]
        scale = np.repeat(scale, scale_block // block_size, axis=1)[:, :wb.shape[1]]
        safe = np.where(scale == 0, 1.0, scale)[:, :, None]
        q = np.clip(np.rint(wb / safe) + half, 0, top).astype(np.uint8)
        return q, scale.astype(np.float32), None
    if mode == "integer_zero_point":
        lo, hi = np.minimum(wb.min(axis=2), 0), np.maximum(wb.max(axis=2), 0)
        scale = np.where(hi == lo, 1.0, (hi - lo) / top)
        zp = np.clip(np.rint(-lo / scale), 0, top)
        q = np.clip(np.rint(wb / scale[:, :, None]) + zp[:, :, None], 0, top).astype(np.uint8)
        return q, scale.astype(np.float32), zp.astype(np.uint8)
    lo, hi = wb.min(axis=2), wb.max(axis=2)
    scale = (hi - lo) / top
    const = scale == 0  # a constant block: q = 2^(bits-1), scale = |lo|, zp = q - sign(lo) (exact)
    safe = np.where(const, 1.0, scale)
    q = np.clip(np.rint((wb - lo[:, :, None]) / safe[:, :, None]), 0, top).astype(np.uint8)
    q[const] = half
    zp = np.where(const, half - np.sign(lo), -lo / safe)
    return q, np.where(const, np.abs(lo), scale).astype(np.float32), zp.astype(np.float32)


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, k: int) -> np.ndarray:
    """Reference inverse of :func:`quantize_blockwise` -> w [N, K] float32."""
    zero = np.float32(1 << (bits - 1)) if zp is None else zp[:, :, None].astype(np.float32)
    w = (q.astype(np.float32) - zero) * scales[:, :, None]
    return w.reshape(q.shape[0], -1)[:, :k]


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' layout along the last axis: 8-bit as is; 4-bit pairs packed into one byte,
    the even element in the low nibble (an odd count is padded with 0).
    B: [N, blocks, block] -> [N, blocks, block * bits / 8]; zero points: [N, blocks] -> [N, ceil(blocks * bits / 8)]."""
    if bits == 8:
        return np.ascontiguousarray(q, np.uint8)
    if q.shape[-1] % 2:
        q = np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def offsets(scales: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Per-block offsets that turn MatMulNBits' implied zero point into a float one.

    MatMulNBits without zero points computes (q - 2^(bits-1)) * s; the weight is (q - zp) * s,
    i.e. that plus (2^(bits-1) - zp) * s for every weight of the block. -> [N, K/block]
    """
    return ((1 << (bits - 1)) - zp) * scales


def block_indicator(k: int, block_size: int) -> np.ndarray:
    """S [K, K/block] with S[i, b] = 1 when input i is in block b: x @ S = per-block sums of x."""
    blocks = -(-k // block_size)
    s = np.zeros((k, blocks), np.float32)
    s[np.arange(k), np.arange(k) // block_size] = 1.0
    return s


# --- activation smoothing (SmoothQuant, folded into the weights) ------------------------
# Calibration texts: prose, code, dialogue, lists and numbers, kept apart from the texts
# benchmarks/perf_bench.py measures agreement on.
CALIBRATION_TEXTS = (
    "The harbour was quiet that morning. Fishing boats rocked against the pier while gulls circled above the "
    "market, where traders were already setting out crates of mackerel, crab and fresh bread.",
    "import numpy as np\n\ndef normalize(rows):\n    norms = np.linalg.norm(rows, axis=1, keepdims=True)\n"
    "    return rows / np.maximum(norms, 1e-12)\n\nprint(normalize(np.eye(3) * 2.0))",
    "Customer: My order number is 88213 and the package never arrived.\nAgent: I am sorry to hear that. I can "
    "see it left our warehouse on 14 March; let me open a claim with the courier for you.",
    "Shopping list: 2 kg potatoes, 1 bag of rice, 6 eggs, olive oil, garlic, 3 lemons, a jar of honey and a "
    "bunch of fresh basil for the soup on Friday.",
    "Volcanoes form where molten rock from the mantle reaches the surface. Most of them lie along the edges of "
    "tectonic plates, such as the Ring of Fire around the Pacific Ocean.",
    "<html><body><h1>Results</h1><table><tr><td>run 7</td><td>0.842</td></tr><tr><td>run 8</td><td>0.857</td>"
    "</tr></table></body></html>",
    "Q: If a tank holds 450 litres and drains at 15 litres per minute, how long until it is empty? A: 450 / 15 "
    "= 30, so the tank is empty after 30 minutes.",
    "Dear committee, thank you for considering my application. Over the past five years I have led a team of "
    "engineers building sensors for remote weather stations in northern Norway.",
)
SMOOTH_CLIP = (1e-4, 1e4)  # smoothing scales are clipped to this range
ActivationMaxima = list  # per layer {"qkv_proj" [hidden], "gate_up_proj" [hidden], "down_proj" [intermediate]}


def calibration_ids(tokenizer: Any) -> list[list[int]]:
    """``CALIBRATION_TEXTS`` as token ids (one list per text, the tokenizer's special tokens included)."""
    return [[int(i) for i in tokenizer(text).input_ids] for text in CALIBRATION_TEXTS]


def calibrate_activations(model: Any, ids: list[list[int]]) -> ActivationMaxima:
    """Max |x_j| per input channel of each layer's ``q_proj`` (= ``qkv_proj``), ``gate_proj``
    (= ``gate_up_proj``) and ``down_proj`` over every token of ``ids`` (one PyTorch forward per
    sequence, the decoder only). -> per layer {kind: [K] float32}."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    maxima: list[dict[str, Any]] = [{} for _ in decoder.layers]

    def hook(i: int, kind: str):
        def record(_module: Any, args: tuple) -> None:
            m = args[0].detach().abs().flatten(0, -2).amax(0).float()  # [B, S, K] -> [K]
            maxima[i][kind] = m if kind not in maxima[i] else torch.maximum(maxima[i][kind], m)
        return record

    handles = []
    for i, layer in enumerate(decoder.layers):
        a, m = layer.self_attn, layer.mlp
        for kind, module in (("qkv_proj", getattr(a, "qkv_proj", None) or a.q_proj),
                             ("gate_up_proj", getattr(m, "gate_up_proj", None) or m.gate_proj),
                             ("down_proj", m.down_proj)):
            handles.append(module.register_forward_pre_hook(hook(i, kind)))
    try:
        with torch.no_grad():
            for x in ids:
                decoder(input_ids=torch.tensor([x]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{k: v.cpu().numpy() for k, v in m.items()} for m in maxima]


def smoothing_scales(act_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel scales: s = act_max^alpha / w_max^(1 - alpha).

    act_max [K]: max |x_j| over calibration tokens; w_max [K]: max_i |W_ij| over the outputs.
    x / s and W * s (columns) keep x @ W.T; a channel with a zero maximum keeps s = 1 and s is
    clipped to ``SMOOTH_CLIP``. -> s [K] float32
    """
    a, w = np.asarray(act_max, np.float64), np.asarray(w_max, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.where(ok, np.where(ok, a, 1.0) ** alpha / np.where(ok, w, 1.0) ** (1.0 - alpha), 1.0)
    return np.clip(s, *SMOOTH_CLIP).astype(np.float32)


def smooth_layer(w: dict, act_max: dict, alpha: float, arch: Arch) -> dict:
    """A layer's weights (``_layer_weights``) with smoothing folded in; the float layer is unchanged.

    * ``qkv_proj`` input = RMSNorm(h) * in_norm: in_norm / s, qkv columns * s;
    * ``gate_up_proj`` input = RMSNorm(h) * post_norm: post_norm / s, gate_up columns * s;
    * ``down_proj`` input = act(gate) * up: the up rows (and nothing of gate) / s, down columns * s.
    """
    inter = arch.intermediate
    s_in = smoothing_scales(act_max["qkv_proj"], np.abs(w["qkv"]).max(axis=0), alpha)  # [hidden]
    s_post = smoothing_scales(act_max["gate_up_proj"], np.abs(w["gate_up"]).max(axis=0), alpha)  # [hidden]
    s_down = smoothing_scales(act_max["down_proj"], np.abs(w["down"]).max(axis=0), alpha)  # [intermediate]
    gate_up = w["gate_up"] * s_post  # [2 * intermediate, hidden]
    gate_up[inter:] /= s_down[:, None]
    return {**w, "in_norm": w["in_norm"] / s_in, "qkv": w["qkv"] * s_in,
            "post_norm": w["post_norm"] / s_post, "gate_up": gate_up, "down": w["down"] * s_down}


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

    def linear(self, x: str, name: str, w: np.ndarray, bias: np.ndarray | None = None,
               transposed: str | None = None) -> str:
        """x @ w.T (+ bias); w: [out, in] float32, name "layers.{i}.{kind}" or "lm_head".

        ``transposed``: fp32 only, an initializer holding w itself (a tied embedding): read
        with transB instead of storing a transposed copy.
        """
        out_features, in_features = w.shape
        kind = name.rsplit(".", 1)[-1]
        if self.weights.bits is None:
            if transposed is not None:
                y = self.op("FusedMatMul", [x, transposed], domain=MS_DOMAIN, transB=1)[0]
            else:
                y = self.op("MatMul", [x, self.const(f"{name}.weight_t", np.asarray(w, np.float32).T)])[0]
        else:
            y = self._nbits(x, name, kind, w)
        if bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias", np.asarray(bias, np.float32))])[0]
        return y

    def _nbits(self, x: str, name: str, kind: str, w: np.ndarray) -> str:
        """MatMulNBits for w [N, K] in the format's mode for this kind of linear (see WeightFormat)."""
        n, k = w.shape
        bits, block, mode, scale_block = self.weights.layout(kind)
        q, scales, zp = quantize_blockwise(w, bits, block, mode, scale_block)
        ins = [x, self.const(f"{name}.qweight", pack_nbits(q, bits)), self.const(f"{name}.scales", scales.ravel())]
        if mode == "integer_zero_point":
            ins.append(self.const(f"{name}.zero_points", pack_nbits(zp, bits).ravel()))
        y = self.op("MatMulNBits", ins, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block,
                    accuracy_level=self.weights.accuracy_level(kind, bits))[0]
        if mode == "float_offset":  # + blocksum(x) @ offsets.T: 2 small MatMuls, [B, S, K] -> [B, S, K/block] -> [B, S, N]
            sums = self.op("MatMul", [x, self.const(f"const.blocksum_{k}x{block}", block_indicator(k, block))])[0]
            m = np.ascontiguousarray(offsets(scales, zp, bits).T, np.float32)
            y = self.op("Add", [y, self.op("MatMul", [sums, self.const(f"{name}.offsets_t", m)])[0]])[0]
        return y


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _layer_weights(layer: Any, norm_offset: float) -> dict:
    """A decoder layer's weights as the graph applies them: norm scales with ``norm_offset``
    added ([hidden]), fused qkv [q+k+v, hidden] (+ bias), o, gate_up [2 * intermediate, hidden], down.

    ``post_norm`` is the norm in front of the MLP; gemma2's sandwich norms add ``attn_out_norm``
    (its post_attention_layernorm, on the attention output) and ``mlp_out_norm`` (on the MLP's)."""
    a, m = layer.self_attn, layer.mlp
    projs = (a.qkv_proj,) if hasattr(a, "qkv_proj") else (a.q_proj, a.k_proj, a.v_proj)  # phi3: fused already
    bias = [getattr(p, "bias", None) for p in projs]
    gate_up = (m.gate_up_proj,) if hasattr(m, "gate_up_proj") else (m.gate_proj, m.up_proj)
    sandwich = hasattr(layer, "pre_feedforward_layernorm")

    def norm(module: Any) -> np.ndarray:
        return _np(module.weight) + np.float32(norm_offset)

    return {
        "in_norm": norm(layer.input_layernorm),
        "post_norm": norm(layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm),
        "attn_out_norm": norm(layer.post_attention_layernorm) if sandwich else None,
        "mlp_out_norm": norm(layer.post_feedforward_layernorm) if sandwich else None,
        "qkv": np.concatenate([_np(p.weight) for p in projs]),
        "qkv_bias": None if bias[0] is None else np.concatenate([_np(b) for b in bias]),
        "o": _np(a.o_proj.weight), "o_bias": None if a.o_proj.bias is None else _np(a.o_proj.bias),
        "gate_up": np.concatenate([_np(p.weight) for p in gate_up]), "down": _np(m.down_proj.weight),
        "q_norm": norm(a.q_norm) if hasattr(a, "q_norm") else None,  # [head_dim] (qwen3)
        "k_norm": norm(a.k_norm) if hasattr(a, "k_norm") else None,
    }


def _rope_caches(g: _Graph, rope: Any, arch: Arch) -> tuple[str, str]:
    """cos, sin [max_positions, rotary_dim/2] with the model's attention scaling folded in
    (angles in float32 like transformers' rotary embedding)."""
    inv = np.asarray(rope.inv_freq, np.float32)
    ang = np.arange(max(arch.max_positions, 1), dtype=np.float32)[:, None] * inv[None, :]
    scale = np.float32(rope.attention_scaling)
    return g.const("rope.cos", np.cos(ang) * scale), g.const("rope.sin", np.sin(ang) * scale)


def _body(g: _Graph, model: Any, arch: Arch, rope: Any, num_layers: int, ids: str, pos: str,
          seqlens: str, total: str, past: list[tuple[str, str]] | None,
          present: list[tuple[str, str]] | None, act_max: ActivationMaxima | None = None) -> tuple[str, str | None]:
    """Embedding and ``num_layers`` layers. Returns (residual stream h, last MLP output or None).

    ``act_max``: calibration maxima (``calibrate_activations``), needed when the format smooths."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    table = _np(decoder.embed_tokens.weight)  # [V, hidden]
    if g.weights.bits is None:
        h = g.op("Gather", [g.const("embed_tokens.weight", table), ids])[0]
    else:  # symmetric 8-bit rows (Q8_0); only the looked-up rows are ever read
        block = g.weights.embed_block_size
        q, scales, _ = quantize_blockwise(table, 8, block, "symmetric")
        h = g.op("GatherBlockQuantized", [g.const("embed_tokens.qweight", q.reshape(table.shape[0], -1)), ids,
                                          g.const("embed_tokens.scales", scales)], domain=MS_DOMAIN,
                 bits=8, block_size=block, gather_axis=0, quantize_axis=1)[0]
    if arch.embed_scale != 1.0:
        h = g.op("Mul", [h, g.const("embed_scale", np.asarray(arch.embed_scale, np.float32))])[0]
    cos, sin = _rope_caches(g, rope, arch)
    rot = {} if 2 * len(rope.inv_freq) == arch.head_dim else {"rotary_embedding_dim": 2 * len(rope.inv_freq)}
    q_dim, kv_dim = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    split_qkv = g.const("split.qkv", np.asarray([q_dim, kv_dim, kv_dim], np.int64))
    split_mlp = g.const("split.mlp", np.asarray([arch.intermediate, arch.intermediate], np.int64))
    prev = None
    alpha = g.weights.smooth_alpha
    if alpha is not None and (act_max is None or len(act_max) < num_layers):
        raise ValueError("this weight format smooths activations: pass act_max from calibrate_activations")
    for i in range(num_layers):
        w = _layer_weights(decoder.layers[i], arch.norm_offset)
        if alpha is not None:
            w = smooth_layer(w, act_max[i], alpha, arch)
        p = f"layers.{i}"
        in_norm = g.const(f"{p}.input_layernorm", w["in_norm"])
        if prev is None:
            x = _norm(g, h, in_norm, arch)
        else:
            x, _, _, h = g.op("SkipSimplifiedLayerNormalization", [prev, h, in_norm], 4, MS_DOMAIN, epsilon=arch.eps)
        qkv = g.linear(x, f"{p}.qkv_proj", w["qkv"], w["qkv_bias"])
        kv_in = ["", ""] if past is None else list(past[i])
        kv_out = present[i] if present is not None else (f"/{p}/present_key", f"/{p}/present_value")
        if rot or arch.qk_norm:  # partial rotary or q/k norms: rotate q and k outside attention
            q, k, v = g.op("Split", [qkv, split_qkv], 3, axis=-1)
            if arch.qk_norm:  # RMSNorm over each head: [B, S, H*D] -> [B, S, H, D] -> norm -> back
                q = _head_norm(g, q, g.const(f"{p}.q_norm", w["q_norm"]), arch.num_heads, arch)
                k = _head_norm(g, k, g.const(f"{p}.k_norm", w["k_norm"]), arch.num_kv_heads, arch)
            heads_q = {"num_heads": arch.num_heads, **rot}
            heads_k = {"num_heads": arch.num_kv_heads, **rot}
            q = g.op("RotaryEmbedding", [q, pos, cos, sin], domain=MS_DOMAIN, interleaved=0, **heads_q)[0]
            k = g.op("RotaryEmbedding", [k, pos, cos, sin], domain=MS_DOMAIN, interleaved=0, **heads_k)[0]
            attn = g.op("GroupQueryAttention", [q, k, v, *kv_in, seqlens, total], domain=MS_DOMAIN,
                        outputs=[f"/{p}/attn", *kv_out], do_rotary=0, **attention_attrs(arch, i))[0]
        else:  # packed q|k|v; attention rotates q and k at position_ids itself
            attn = g.op("GroupQueryAttention", [qkv, "", "", *kv_in, seqlens, total, cos, sin, pos], domain=MS_DOMAIN,
                        outputs=[f"/{p}/attn", *kv_out], do_rotary=1, rotary_interleaved=0,
                        **attention_attrs(arch, i))[0]
        o = g.linear(attn, f"{p}.o_proj", w["o"], w["o_bias"])
        if w["attn_out_norm"] is not None:  # gemma2: norm(attention output) before the residual add
            o = _norm(g, o, g.const(f"{p}.attn_out_norm", w["attn_out_norm"]), arch)
        post = g.const(f"{p}.post_attention_layernorm", w["post_norm"])  # the MLP's input norm (any family)
        x, _, _, h = g.op("SkipSimplifiedLayerNormalization", [o, h, post], 4, MS_DOMAIN, epsilon=arch.eps)
        gu = g.linear(x, f"{p}.gate_up_proj", w["gate_up"])
        gate, up = g.op("Split", [gu, split_mlp], 2, axis=-1)
        if arch.activation == "silu":
            act = g.op("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0)[0]  # x * sigmoid(x)
        else:
            act = g.op("FastGelu", [gate], domain=MS_DOMAIN)[0]  # tanh approximation
        prev = g.linear(g.op("Mul", [act, up])[0], f"{p}.down_proj", w["down"])
        if w["mlp_out_norm"] is not None:  # gemma2: norm(MLP output) before the residual add
            prev = _norm(g, prev, g.const(f"{p}.mlp_out_norm", w["mlp_out_norm"]), arch)
    return h, prev


def _norm(g: _Graph, x: str, weight: str, arch: Arch) -> str:
    """RMSNorm of x [..., n] over its last axis with scales ``weight`` [n] (offset already added)."""
    return g.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=arch.eps, stash_type=1)[0]


def _softcap(g: _Graph, x: str, cap: float) -> str:
    """cap * tanh(x / cap): gemma2's soft-capping of the output logits (attention's is
    GroupQueryAttention's ``softcap``)."""
    c = g.const(f"const.softcap_{cap:g}", np.asarray(cap, np.float32))
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c])[0]])[0], c])[0]


def _head_norm(g: _Graph, x: str, weight: str, heads: int, arch: Arch) -> str:
    """RMSNorm of every head of x [B, S, heads * D] with ``weight`` [D] (qwen3's q_norm / k_norm)."""
    split = g.op("Reshape", [x, g.const(f"shape.heads{heads}", np.asarray([0, 0, heads, arch.head_dim], np.int64))])[0]
    y = _norm(g, split, weight, arch)
    return g.op("Reshape", [y, g.const("shape.merge_heads", np.asarray([0, 0, -1], np.int64))])[0]


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


def _keep_last(g: _Graph, x: str) -> str:
    """x [B, S, hidden] -> its last ``logits_to_keep`` positions (0: all of them).

    ``logits_to_keep`` is a graph input *with* an initializer (default 0): callers that do not
    know it (optimum, plain onnxruntime) get every position's logits as before; the runtime
    sets 1 for a prompt, so the output layer runs for one row instead of S."""
    g.inits[LOGITS_TO_KEEP] = np.asarray(0, np.int64)
    neg = g.op("Neg", [LOGITS_TO_KEEP])[0]
    starts = g.op("Unsqueeze", [neg, g.const("const.axis0", np.asarray([0], np.int64))])[0]
    return g.op("Slice", [x, starts, g.const("const.i64_max", np.asarray([np.iinfo(np.int64).max], np.int64)),
                          g.const("const.axis1", np.asarray([1], np.int64))])[0]


def build_decoder_graph(model: Any, rope: Any, weights: WeightFormat, act_max: ActivationMaxima | None = None) -> Any:
    """The decoder with past as an onnx ModelProto (optimum's input/output names).

    ``act_max``: ``calibrate_activations``' maxima, needed when ``weights.smooth_alpha`` is set."""
    from onnx import TensorProto, helper

    arch = Arch.from_model(model)
    g = _Graph(weights)
    L, H, D = arch.num_layers, arch.num_kv_heads, arch.head_dim
    past = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(L)]
    present = [(f"present.{i}.key", f"present.{i}.value") for i in range(L)]
    seqlens, total = _seqlens(g, "attention_mask")
    h, prev = _body(g, model, arch, rope, L, "input_ids", "position_ids", seqlens, total, past, present, act_max)
    final = g.const("norm.weight", _np((model.get_decoder() if hasattr(model, "get_decoder") else model.model).norm.weight)
                    + arch.norm_offset)
    if prev is None:  # no layers
        x = _norm(g, h, final, arch)
    else:
        x = g.op("SkipSimplifiedLayerNormalization", [prev, h, final], 1, MS_DOMAIN, epsilon=arch.eps)[0]
    x = _keep_last(g, x)
    head = model.get_output_embeddings().weight
    embed = (model.get_decoder() if hasattr(model, "get_decoder") else model.model).embed_tokens.weight
    tied = head.data_ptr() == embed.data_ptr()
    logits = g.linear(x, "lm_head", _np(head), transposed="embed_tokens.weight" if tied else None)
    if arch.final_softcap:
        _softcap(g, logits, arch.final_softcap)
    g.nodes[-1].output[0] = "logits"
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info(LOGITS_TO_KEEP, i64, [])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch_size", "logits_sequence_length", arch.vocab])]
    for (pk, pv), (ok, ov) in zip(past, present, strict=True):
        inputs += [helper.make_tensor_value_info(n, f, ["batch_size", H, "past_sequence_length", D]) for n in (pk, pv)]
        outputs += [helper.make_tensor_value_info(n, f, ["batch_size", H, "present_sequence_length", D])
                    for n in (ok, ov)]
    return _model_proto(g, inputs, outputs, "edgekv-decoder",
                        {KV_BUFFER_META: "shared", "edgekv.weights": weights.name})


def build_key_graph(model: Any, rope: Any, key_layer: int, pooling: str, weights: WeightFormat,
                    act_max: ActivationMaxima | None = None) -> Any:
    """The retrieval-key graph: ``input_ids``, ``attention_mask`` [B, S] (right padding) -> ``pooled`` [B, hidden].

    The first ``key_layer`` layers at positions 0..S-1 (as ``KeyModel``), no final norm,
    then mean over the mask or the last token. Initializer names and values equal the
    decoder's when given the same ``weights`` and ``act_max``.
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
    h, prev = _body(g, model, arch, rope, key_layer, "input_ids", pos, seqlens, total, None, None, act_max)
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


ROW_READERS = ("Gather", "GatherBlockQuantized")  # ops that read a table by row


def save_graphs(decoder: Any, key: Any, folder: str, decoder_file: str, key_file: str, data_file: str) -> dict:
    """Write both graphs with their initializers in one external-data file (each tensor once).

    Tensors are 4 KiB-aligned in ``data_file`` so onnxruntime can memory-map them; the key
    graph's initializers point at the decoder's bytes (same name, same bytes: checked).
    Returns {"files": written names, "row_tables": tables every graph only reads by row}:
    ``{name: {file, offset, length, dtype, shape}}`` — the runtime maps those once and hands
    them to both sessions (``edgekv.runtime.decoder.map_row_tables``).
    """
    import hashlib
    import os

    from onnx import TensorProto, helper, save_model

    placed: dict[str, tuple[int, int, str]] = {}  # name -> (offset, length, sha256)
    with open(os.path.join(folder, data_file), "wb") as f:
        for model in (decoder, key):
            for t in model.graph.initializer:
                if len(t.raw_data) < 1024:
                    continue  # small constants stay inside the graph
                digest = hashlib.sha256(t.raw_data).hexdigest()
                if t.name in placed:
                    if placed[t.name][2] != digest:
                        raise ValueError(f"initializer {t.name} differs between the decoder and the key graph")
                    continue
                f.write(b"\0" * (-f.tell() % 4096))
                placed[t.name] = (f.tell(), len(t.raw_data), digest)
                f.write(t.raw_data)
    row_only: dict[str, bool] = {}
    for model in (decoder, key):
        users: dict[str, set] = {}
        for node in model.graph.node:
            for name in node.input:
                users.setdefault(name, set()).add(node.op_type)
        for t in model.graph.initializer:
            row_only[t.name] = row_only.get(t.name, True) and users.get(t.name, set()) <= set(ROW_READERS)
    tables = {}
    for model, name in ((decoder, decoder_file), (key, key_file)):
        for t in model.graph.initializer:
            if t.name in placed and t.raw_data:
                off, size, _ = placed[t.name]
                if row_only[t.name]:
                    tables[t.name] = {"file": data_file, "offset": off, "length": size, "shape": list(t.dims),
                                      "dtype": str(helper.tensor_dtype_to_np_dtype(t.data_type))}
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", data_file), ("offset", str(off)), ("length", str(size))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
        save_model(model, os.path.join(folder, name))
    return {"files": [decoder_file, key_file, data_file], "row_tables": tables}


def graph_stats(proto: Any) -> dict:
    """Node count per op type and the number of initializers (for summaries and benchmarks)."""
    import collections

    return {"nodes": len(proto.graph.node),
            "ops": dict(collections.Counter(n.op_type for n in proto.graph.node).most_common()),
            "initializers": len(proto.graph.initializer)}


# --- weight-only formats for a traced graph (the VLM decoder on embeddings) ---------------
# module name in a traced decoder's MatMul -> the kind of linear WeightFormat.layout takes
LINEAR_KINDS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "qkv_proj": "qkv_proj",
                "o_proj": "o_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                "gate_up_proj": "gate_up_proj", "down_proj": "down_proj", "lm_head": "lm_head"}


def linear_kind(node_name: str) -> str | None:
    """The kind of decoder linear a traced MatMul belongs to (by its module path), or None."""
    parts = node_name.strip("/").split("/")
    return next((LINEAR_KINDS[p] for p in reversed(parts) if p in LINEAR_KINDS), None)


def quantize_linears(model: Any, weights: WeightFormat) -> int:
    """In place: every MatMul of ``model`` (an onnx ModelProto) whose weight is a 2-D initializer
    [K, N] of a decoder linear becomes ``weights``' MatMulNBits, with the kernels and layouts the
    fused graph uses for that kind (``_Graph._nbits``). Smoothing needs the fused graph's
    calibration and is refused. -> the number of linears replaced"""
    from onnx import helper, numpy_helper

    if weights.bits is None:
        return 0
    if weights.smooth_alpha is not None:
        raise ValueError("quantize_linears: smoothing needs activation maxima; use a format without it")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    g = _Graph(weights)
    g._count = 10 ** 6  # node names of their own, apart from the traced graph's
    nodes, replaced, dropped = [], 0, set()
    for n in graph.node:
        kind = linear_kind(n.name) if n.op_type == "MatMul" else None
        w_name = n.input[1] if kind else ""
        if kind is None or w_name not in inits or len(inits[w_name].dims) != 2:
            nodes.append(n)
            continue
        start = len(g.nodes)
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32).T  # [N out, K in]
        y = g._nbits(n.input[0], f"q{replaced}.{kind}", kind, w)
        nodes += g.nodes[start:] + [helper.make_node("Identity", [y], [n.output[0]], name=f"{n.name}/nbits_out")]
        replaced += 1
        users[w_name] -= 1
        if users[w_name] == 0:
            dropped.add(w_name)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep + [numpy_helper.from_array(v, k) for k, v in g.inits.items()])
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return replaced
