"""Export of vision-language models (LLaVA): vision graph, decoder on embeddings, token table.

optimum does not export these families, so edgekv writes three pieces and the runtime
splices them (``edgekv.runtime.multimodal``):

* ``vision.onnx`` — ``VisionEncoder`` (built by :func:`_modules`): the vision tower + projector.
  ``pixel_values`` [B, 3, h, w] float32 -> ``image_features`` [B, N, hidden] float32.
* ``decoder_embeds.onnx`` — ``EmbedsDecoder``: the language model + LM head taking
  ``inputs_embeds`` [B, S, hidden], ``attention_mask`` [B, P+S], ``position_ids`` [B, S],
  ``past_key_values.{l}.key|value`` [B, H, P, D] -> ``logits`` [B, S, V],
  ``present.{l}.key|value`` [B, H, P+S, D]; the same past layout as the text decoder, so
  memory injection is unchanged. Traced with ``torch.onnx.export(dynamo=False)`` under
  optimum's model patcher of the text family (``sdpa_mask_without_vmap``, the
  ``DynamicLayer.update`` and packed-sequence fixes, ONNX-compatible ops).
* ``embed_tokens.npy`` — the input embedding table [V, hidden] float32, which the runtime
  memory-maps to embed token ids (text tokens; image positions take the vision features).

The image processor's settings go into ``manifest.json`` (``vision.processor``), read by
``edgekv.runtime.vision``. The key graph ``key.onnx`` takes ``inputs_embeds`` (manifest
``key.input``), so the retrieval key of an image+text prompt covers the image. Everything
else (tokenizer, HNSW index, manifest, staging folder) is shared with the text-only export.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from edgekv.errors import EdgeKVError, InputError

VISION_FILE = "vision.onnx"
DECODER_EMBEDS_FILE = "decoder_embeds.onnx"
EMBEDDINGS_FILE = "embed_tokens.npy"
KEY_INPUT_EMBEDS = "inputs_embeds"  # manifest key.input: key.onnx takes token embeddings (image spliced in)
# model_type -> (transformers class, image token attribute of the config)
VLM_TYPES = {"llava": ("LlavaForConditionalGeneration", "image_token_index"),
             "idefics3": ("Idefics3ForConditionalGeneration", "image_token_id"),
             "edgekv_tiny_vlm": ("TinyVLM", "image_token_index")}  # export/tiny_vlm.py (our own class)
TINY_VLM = "edgekv_tiny_vlm"
PROBE_PROMPT = "what colour is the triangle?"


def vlm_type(model: str) -> str | None:
    """The VLM family of a model folder or built-in VLM name (``None`` for anything else); reads config.json only."""
    from edgekv.export.models import VLM_BUILTINS

    if isinstance(model, str) and model in VLM_BUILTINS:
        return VLM_BUILTINS[model]
    path = os.path.join(model, "config.json") if isinstance(model, str) and os.path.isdir(model) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return None
    return model_type if model_type in VLM_TYPES else None


def stage_names(opts: Any) -> list[str]:
    names = ["load", "vision", "decoder"] + (["check"] if opts.check else []) + ["key graph", "tokenizer"]
    return [*names, *(["index"] if opts.memory else []), "manifest"]


# --- loading ---------------------------------------------------------------------------
def load_vlm(model: str) -> tuple[Any, Any]:
    """(Backbone with the VLM as ``model``, the Hugging Face image processor) for a folder."""
    from types import SimpleNamespace

    import torch
    import transformers

    from edgekv.export.models import (
        VLM_BUILTINS,
        Backbone,
        builtin_vlm_folder,
        model_fingerprint,
        rope_spec,
    )
    from edgekv.modelshape import ModelShape

    source = model
    model = builtin_vlm_folder(model) if model in VLM_BUILTINS else model
    family = vlm_type(model)
    if family == TINY_VLM:  # our own module (export/tiny_vlm.py); config.json is only read as data
        from edgekv.export.tiny_vlm import load_tiny_vlm

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
    rope = rope_spec(SimpleNamespace(model=language_model(hf_model)))
    bb = Backbone(hf_model, tok, shape, rope, model_fingerprint(hf_model), source, eos_ids)
    return bb, proc


def language_model(vlm: Any) -> Any:
    """The text decoder (HF base model with layers, embeddings, rotary) inside a VLM."""
    return getattr(vlm.model, "language_model", None) or vlm.model.text_model


def image_tokens(bb: Any) -> Any:
    """How the family writes an image into the prompt (:class:`edgekv.runtime.multimodal.ImageTokens`)."""
    from edgekv.runtime.multimodal import ImageTokens

    cfg = bb.model.config
    text, _ = image_token(bb)
    if cfg.model_type == "idefics3":
        per_tile = int((cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 / cfg.scale_factor ** 2)
        return ImageTokens("idefics3", text, per_tile)
    return ImageTokens("llava" if cfg.model_type == TINY_VLM else cfg.model_type, text)  # tiny-vlm: N tokens


def image_token(bb: Any) -> tuple[str, int]:
    """(image token text, id) of a VLM backbone; the tokenizer must encode it as one token."""
    tid = int(getattr(bb.model.config, VLM_TYPES[bb.model.config.model_type][1]))
    text = bb.tokenizer.convert_ids_to_tokens(tid)
    if list(bb.tokenizer(text, add_special_tokens=False).input_ids) != [tid]:
        raise InputError(f"{bb.source}: the tokenizer does not encode the image token {text!r} as id {tid}")
    return text, tid


# --- the two graphs ----------------------------------------------------------------------
def _modules():
    """The torch modules, defined on first use so importing this file needs no torch."""
    import torch

    class VisionEncoder(torch.nn.Module):
        """pixel_values [B, 3, h, w] -> image_features [B, N, hidden]: tower, layer/CLS selection, projector."""

        def __init__(self, vlm: Any):
            super().__init__()
            self.vlm = vlm
            if vlm.config.model_type == "idefics3":
                self.register_buffer("patch_positions", idefics3_patch_positions(vlm), persistent=False)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            if self.vlm.config.model_type == "idefics3":
                return self.idefics3(pixel_values)
            if self.vlm.config.model_type == TINY_VLM:  # MobileNetV2 grid -> projector
                return self.vlm.get_image_features(pixel_values)
            # LlavaModel.get_image_features without its final list() (which traces as a fixed-size Split)
            cfg, m = self.vlm.config, self.vlm.model
            hidden = m.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) \
                else [cfg.vision_feature_layer]
            drop_cls = cfg.vision_feature_select_strategy == "default"
            h = torch.cat([hidden[i][:, 1:] if drop_cls else hidden[i] for i in layers], dim=-1)
            return m.multi_modal_projector(h)  # [B, N, hidden]

        def idefics3(self, pixel_values: torch.Tensor) -> torch.Tensor:
            """Idefics3Model.get_image_features for full tiles (image_size x image_size, no padding):
            every patch is real, so the position ids are one constant row and no attention mask is
            needed (the per-image loop over patch masks would otherwise unroll into the graph)."""
            vm = self.vlm.model.vision_model
            x = vm.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [T, P, Dv]
            x = x + vm.embeddings.position_embedding(self.patch_positions)[None]
            h = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
            return self.vlm.model.connector(h)  # [T, P / scale^2, hidden]

    class EmbedsDecoder(torch.nn.Module):
        """inputs_embeds + mask + positions + flat past (K0, V0, K1, ...) -> logits, flat present."""

        def __init__(self, vlm: Any):
            super().__init__()
            self.lm = language_model(vlm)
            self.lm_head = vlm.lm_head
            self.num_layers = vlm.config.text_config.num_hidden_layers

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            from transformers import DynamicCache

            cache = DynamicCache()
            for i in range(self.num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            layers = out.past_key_values.layers
            return (self.lm_head(out.last_hidden_state), *[t for layer in layers for t in (layer.keys, layer.values)])

    return VisionEncoder, EmbedsDecoder


def idefics3_patch_positions(vlm: Any) -> Any:
    """Position ids [P] of a full tile, computed as Idefics3VisionEmbeddings does: bucketised
    fractional coordinates (which, through its ``* (1 - 1e-6)``, are not simply 0..n-1)."""
    import torch

    n = vlm.model.vision_model.embeddings.num_patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    frac = torch.arange(n, dtype=torch.float32) / n * (1 - 1e-6)
    b = torch.bucketize(frac, boundaries, right=True)
    return (b[:, None] * n + b).flatten()


@contextlib.contextmanager
def text_patches(text_config: Any, module: Any) -> Iterator[None]:
    """optimum's decoder-with-past patcher of the text family, entered around ``module``."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        ctor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=text_config.model_type, task="text-generation-with-past",
            library_name="transformers")
    except (KeyError, ValueError) as e:
        raise InputError(f"optimum has no ONNX config for {text_config.model_type!r} decoders ({e})") from None
    onnx_config = ctor(text_config)
    saved = [(m.config, m.config.use_cache) for m in module.modules()
             if hasattr(m, "config") and hasattr(m.config, "use_cache")]
    try:
        with onnx_config.patch_model_for_export(module):
            yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str], dict]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    axes = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past})
    axes.update({n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in present})
    return ["inputs_embeds", "attention_mask", "position_ids", *past], ["logits", *present], axes


def export_embeds_decoder(bb: Any, path: str, opset: int) -> None:
    """Write ``EmbedsDecoder`` of ``bb.model`` to ``path`` (traced with batch 2, past 3, new 4)."""
    import torch

    from edgekv.export.onnx_export import quiet_export

    _, decoder_cls = _modules()
    dec = decoder_cls(bb.model).eval()
    s = bb.shape
    g = torch.Generator().manual_seed(0)
    B, P, S = 2, 3, 4
    embeds = torch.randn(B, S, s.hidden_size, generator=g)
    mask = torch.ones(B, P + S, dtype=torch.int64)
    pos = torch.arange(P, P + S, dtype=torch.int64)[None].repeat(B, 1)
    past = [torch.randn(B, s.num_kv_heads, P, s.head_dim, generator=g) for _ in range(2 * s.num_layers)]
    inputs, outputs, axes = decoder_io_names(s.num_layers)
    with quiet_export(), text_patches(bb.model.config.text_config, dec), torch.no_grad():
        torch.onnx.export(dec, (embeds, mask, pos, *past), path, dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)


def export_vision(bb: Any, pixel_shape: tuple[int, ...], path: str, opset: int) -> None:
    """Write ``VisionEncoder`` (built by :func:`_modules`) to ``path``; dynamic batch (``pixel_shape`` is one image's [3, h, w])."""
    import torch

    from edgekv.export.onnx_export import quiet_export

    vision_cls, _ = _modules()
    enc = vision_cls(bb.model).eval()
    pixels = torch.randn(2, *pixel_shape, generator=torch.Generator().manual_seed(0))
    with quiet_export(), torch.no_grad():  # no masks, no cache: the vision tower traces as is
        torch.onnx.export(enc, (pixels,), path, dynamo=False, opset_version=opset, input_names=["pixel_values"],
                          output_names=["image_features"], do_constant_folding=True,
                          dynamic_axes={"pixel_values": {0: "batch_size"}, "image_features": {0: "batch_size"}})


def save_embeddings(bb: Any, path: str) -> None:
    import numpy as np

    table = bb.model.get_input_embeddings().weight.detach().float().cpu().numpy()  # [V, hidden]
    np.save(path, np.ascontiguousarray(table, np.float32))


# --- check against PyTorch ---------------------------------------------------------------
def probe_image(size: int = 48) -> Any:
    """A deterministic RGB test card (colour gradients and a square)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 255 // (size - 1), y * 255 // (size - 1), np.full_like(x, 128)], axis=-1).astype(np.uint8)
    arr[size // 4:size // 2, size // 4:size // 2] = (250, 20, 20)
    return Image.fromarray(arr)


def check_vlm(bb: Any, folder: str, proc_dict: dict) -> dict:
    """ONNX (vision + embeddings + decoder) vs PyTorch on an image+text probe, without and with
    the first part of the sequence injected as past. Returns the max |logit diff| of both."""
    import numpy as np
    import torch

    from edgekv.runtime.multimodal import EncodedImage, MultimodalModel
    from edgekv.runtime.vision import ImageProcessorConfig, preprocess

    text, tid = image_token(bb)
    tokens = image_tokens(bb)
    mm = MultimodalModel.open(folder, bb.shape.num_layers, bb.shape.num_kv_heads, bb.shape.head_dim, tid, tokens)
    pre = preprocess(probe_image(), ImageProcessorConfig.from_hf(proc_dict))
    img = EncodedImage(mm.image_features(pre.pixel_values), pre.rows, pre.cols)
    ids = list(bb.tokenizer(tokens.text(img) + f"\n{PROBE_PROMPT}").input_ids)
    split = len(ids) - 4
    pixels = torch.from_numpy(pre.pixel_values)
    pixels = pixels[None] if bb.model.config.model_type == "idefics3" else pixels  # [1, T, 3, h, w]
    with torch.no_grad():
        joint = bb.model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=False).logits[0].numpy()
        pre_out = bb.model(input_ids=torch.tensor([ids[:split]]), pixel_values=pixels, use_cache=True)
    kv = [(layer.keys.numpy(), layer.values.numpy()) for layer in pre_out.past_key_values.layers]
    whole, _ = mm.forward_ids(ids, img.features, mm.decoder.empty_past())
    tail, _ = mm.forward_ids(ids[split:], img.features[:, :0], kv)
    res = {"max_abs_diff_no_past": float(np.abs(whole[0] - joint).max()),
           "max_abs_diff_with_past": float(np.abs(tail[0] - joint[split:]).max()),
           "logit_scale": float(np.abs(joint).max()), "num_tokens": len(ids),
           "num_image_tokens": int(img.features.shape[1])}
    worst = max(res["max_abs_diff_no_past"], res["max_abs_diff_with_past"])
    if worst > 1e-4 * max(1.0, res["logit_scale"]):
        raise EdgeKVError(f"the exported vision/decoder graphs disagree with PyTorch (max |logit diff| {worst:.2e}); "
                          f"this VLM does not export correctly")
    return res


# --- the whole export ----------------------------------------------------------------------
def export_vlm_into(model: str, folder: str, opts: Any, stages: Any) -> dict:
    """The VLM counterpart of ``pipeline._export_into``: same stages, options and manifest, plus
    the vision graph, the embeddings table and the manifest's ``vision`` section."""
    from edgekv.export import pipeline as pl
    from edgekv.export.onnx_export import KEY_FILE, export_embeds_key_graph, files_bytes, onnx_files
    from edgekv.manifest import file_hashes, write_manifest
    from edgekv.runtime.vision import ImageProcessorConfig

    if opts.quantize_weights:
        raise InputError("--quantize-weights is not supported for vision-language models yet; export fp32")
    spec = pl.memory_spec(opts.memory) if opts.memory else None
    with stages.stage("load"):
        bb, proc = load_vlm(model)
        proc_cfg = ImageProcessorConfig.from_hf(proc.to_dict())
    if spec is not None:
        pl.check_memory(spec, opts.memory, bb, opts.key_layer)
    key = pl.resolve_key(bb, opts, spec)
    token_text, token_id = image_token(bb)
    with stages.stage("vision"):
        from edgekv.runtime.vision import preprocess

        pixels = preprocess(probe_image(), proc_cfg).pixel_values
        export_vision(bb, tuple(pixels.shape[1:]), os.path.join(folder, VISION_FILE), opts.opset)
        save_embeddings(bb, os.path.join(folder, EMBEDDINGS_FILE))
        vision_names = [*onnx_files(folder, VISION_FILE), EMBEDDINGS_FILE]
    with stages.stage("decoder"):
        export_embeds_decoder(bb, os.path.join(folder, DECODER_EMBEDS_FILE), opts.opset)
        decoder_names = onnx_files(folder, DECODER_EMBEDS_FILE)
    summary: dict = {"decoder": {"weights": "fp32", "bytes": files_bytes(folder, decoder_names)}}
    if opts.check:
        with stages.stage("check"):
            summary["decoder"]["fp32_check"] = check_vlm(bb, folder, proc.to_dict())
    with stages.stage("key graph"):
        # the key on token embeddings: image positions hold the vision features (docs/multimodal.md)
        export_embeds_key_graph(language_model(bb.model), key[0], key[1], os.path.join(folder, KEY_FILE), opts.opset)
        key_names = onnx_files(folder, KEY_FILE)
    with stages.stage("tokenizer"):
        tokenizer = pl.export_tokenizer(bb, folder)
    index = None
    if opts.memory:
        with stages.stage("index"):
            from edgekv.index import INDEX_META, build_index

            index = build_index(opts.memory, folder)
    with stages.stage("manifest"):
        names = [*decoder_names, *vision_names, *key_names, pl.TOKENIZER_FILE]
        names += [index["file"], INDEX_META] if index else []
        data = pl.manifest_data(bb, key, "fp32", tokenizer, file_hashes(folder, names), index)
        data["decoder"]["file"] = DECODER_EMBEDS_FILE
        data["key"]["input"] = KEY_INPUT_EMBEDS
        tokens = image_tokens(bb)
        data["vision"] = {"family": tokens.family, "file": VISION_FILE, "embeddings": EMBEDDINGS_FILE,
                          "image_token": token_text, "image_token_id": token_id, "processor": proc_cfg.to_dict(),
                          "tokens_per_tile": tokens.tokens_per_tile, "fake_image_token": tokens.fake_token,
                          "global_image_token": tokens.global_token}
        write_manifest(folder, data)
    summary.update(model=str(bb.source), model_type=bb.shape.model_type, model_fingerprint=bb.fingerprint,
                   key={"layer": key[0], "pooling": key[1]}, index=index, add_bos=tokenizer["add_bos"],
                   vision={"image_token_id": token_id, "bytes": files_bytes(folder, vision_names)},
                   files={n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))})
    return summary
