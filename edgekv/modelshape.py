"""What the memory needs to know about a backbone, read from its config without torch.

MODEL may be a Hugging Face model folder (``config.json`` inside), a ``config.json`` file,
or a built-in name. Vision-language configs are read through their ``text_config``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from edgekv.errors import InputError

# The decoder families edgekv's fused ONNX graph covers (export/decoder_graph.py), by config
# ``model_type``: llama's layer with per-family changes. Others export through optimum's graph.
FUSED_FAMILIES = ("llama", "qwen2", "gemma", "mistral", "qwen3", "phi3", "gemma2")
# Of those, the families whose fused graph applies the sliding window itself (GroupQueryAttention's
# ``local_window_size`` on the windowed layers): their context is not capped at the window.
WINDOWED_FAMILIES = ("gemma2",)

# Built-in backbones, by name: (Hugging Face config fields that matter to the memory).
BUILTIN_CONFIGS: dict[str, dict] = {
    "smollm2-135m": {
        "model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64, "rope_theta": 100000.0,
        "vocab_size": 49152, "max_position_embeddings": 8192,
    },
    # SmolLM2-135M with one added <image> token (the memory holds the language model's KV)
    "tiny-vlm": {
        "model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64, "rope_theta": 100000.0,
        "vocab_size": 49153, "max_position_embeddings": 8192,
    },
}


@dataclass(frozen=True)
class ModelShape:
    """The KV geometry of a decoder: what one memory entry's payload looks like."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int  # the retrieval-key dimension R
    vocab_size: int = 0
    max_positions: int = 0

    @staticmethod
    def from_config(cfg: dict) -> ModelShape:
        text = cfg.get("text_config") or cfg
        try:
            heads = int(text["num_attention_heads"])
            hidden = int(text["hidden_size"])
            return ModelShape(
                model_type=str(cfg.get("model_type", "unknown")),
                num_layers=int(text["num_hidden_layers"]),
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                hidden_size=hidden,
                vocab_size=int(text.get("vocab_size") or 0),
                max_positions=context_positions(text),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"model config lacks a usable decoder shape ({e!s}); is this a causal LM config?") from None


def context_positions(cfg: dict) -> int:
    """Positions the runtime may use: max_position_embeddings, capped at the sliding window when
    the model has one in use (mistral, phi3, qwen2/qwen3 with use_sliding_window, families exported
    through optimum's graph): those graphs attend over the whole context, which equals windowed
    attention only up to the window. ``WINDOWED_FAMILIES`` apply the window and keep the context."""
    n = int(cfg.get("max_position_embeddings") or 0)
    capped = cfg.get("use_sliding_window", True) and cfg.get("model_type") not in WINDOWED_FAMILIES
    window = cfg.get("sliding_window") if capped else None
    return min(n, int(window)) if window and n else n


def load_model_config(model: str) -> dict:
    """The config dict for MODEL: built-in name, model folder, or config.json path."""
    if model in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[model])
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise InputError(f"{model}: folder has no config.json; pass a Hugging Face model folder")
    if not os.path.isfile(path):
        names = ", ".join(sorted(BUILTIN_CONFIGS))
        raise InputError(f"model {model!r} not found: pass a model folder, a config.json, or one of: {names}")
    if path.endswith(".gguf"):
        return _gguf_config(path)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read model config ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: model config must be a JSON object")
    return cfg


def _gguf_config(path: str) -> dict:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise InputError("reading a .gguf needs the host tools: pip install 'edgekv[host]'") from None
    reader = GGUFReader(path)
    fields = {k: v for k, v in reader.fields.items()}

    def val(key: str):
        f = fields.get(key)
        if f is None:
            return None
        return f.parts[f.data[0]].tolist()[0] if f.data else None

    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    return {
        "model_type": arch, "num_hidden_layers": val(f"{arch}.block_count"),
        "num_attention_heads": val(f"{arch}.attention.head_count"),
        "num_key_value_heads": val(f"{arch}.attention.head_count_kv"),
        "hidden_size": val(f"{arch}.embedding_length"),
        "max_position_embeddings": val(f"{arch}.context_length"),
    }


def model_shape(model: str) -> ModelShape:
    return ModelShape.from_config(load_model_config(model))
