"""Export of vision-language models (LLaVA): vision graph, decoder on embeddings, token table.

optimum does not export these families, so edgekv writes three pieces and the runtime
splices them (``edgekv.runtime.multimodal``):

* ``vision.onnx`` — ``VisionEncoder`` (:func:`edgekv.host.vlm.vision_encoder`): the vision tower + projector.
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

import os
from typing import Any

from edgekv.errors import EdgeKVError
from edgekv.export.common import (
    ExportOptions,
    check_memory,
    manifest_data,
    memory_spec,
    resolve_key,
    tokenizer_and_index,
)
from edgekv.host.models import load_vlm, text_decoder
from edgekv.host.vlm import vision_encoder

VISION_FILE = "vision.onnx"
DECODER_EMBEDS_FILE = "decoder_embeds.onnx"
EMBEDDINGS_FILE = "embed_tokens.npy"
KEY_INPUT_EMBEDS = "inputs_embeds"  # manifest key.input: key.onnx takes token embeddings (image spliced in)
PROBE_PROMPT = "what colour is the triangle?"


def stage_names(opts: ExportOptions) -> list[str]:
    names = ["load", "vision", "decoder"] + (["check"] if opts.check else []) + (["quantise"] if opts.quantize_weights
                                                                                 else []) + ["key graph", "tokenizer"]
    return [*names, *(["index"] if opts.memory else []), "manifest"]


# --- the two graphs ----------------------------------------------------------------------
def _embeds_decoder_class() -> type:
    """The torch module, defined on first use so importing this file needs no torch."""
    import torch

    class EmbedsDecoder(torch.nn.Module):
        """inputs_embeds + mask + positions + flat past (K0, V0, K1, ...) -> logits, flat present."""

        def __init__(self, vlm: Any):
            super().__init__()
            self.lm = text_decoder(vlm)
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

    return EmbedsDecoder


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

    from edgekv.export.onnx_export import optimum_patches, quiet_export

    dec = _embeds_decoder_class()(bb.model).eval()
    s = bb.shape
    g = torch.Generator().manual_seed(0)
    B, P, S = 2, 3, 4
    embeds = torch.randn(B, S, s.hidden_size, generator=g)
    mask = torch.ones(B, P + S, dtype=torch.int64)
    pos = torch.arange(P, P + S, dtype=torch.int64)[None].repeat(B, 1)
    past = [torch.randn(B, s.num_kv_heads, P, s.head_dim, generator=g) for _ in range(2 * s.num_layers)]
    inputs, outputs, axes = decoder_io_names(s.num_layers)
    patches = optimum_patches(bb.model.config.text_config, dec, "text-generation-with-past")
    with quiet_export(), patches, torch.no_grad():
        torch.onnx.export(dec, (embeds, mask, pos, *past), path, dynamo=False, opset_version=opset,
                          input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)


def export_vision(bb: Any, pixel_shape: tuple[int, ...], path: str, opset: int) -> None:
    """Write ``VisionEncoder`` (:func:`edgekv.host.vlm.vision_encoder`) to ``path``; dynamic batch (``pixel_shape`` is one image's [3, h, w])."""
    import torch

    from edgekv.export.onnx_export import quiet_export

    enc = vision_encoder(bb.model)
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
    the first part of the sequence injected as past. Returns the max |logit diff| of both;
    raises when they exceed fp32 rounding."""
    res = vlm_logits_vs_torch(bb, folder, proc_dict)
    worst = max(res["max_abs_diff_no_past"], res["max_abs_diff_with_past"])
    if worst > 1e-4 * max(1.0, res["logit_scale"]):
        raise EdgeKVError(f"the exported vision/decoder graphs disagree with PyTorch (max |logit diff| {worst:.2e}); "
                          f"this VLM does not export correctly")
    return res


def quantise_vlm_decoder(bb: Any, folder: str, proc_dict: dict, weights: str, check: bool) -> dict:
    """``decoder_embeds.onnx`` with weight-only ``weights`` linears (``quantize_linears``; int8
    without smoothing, which needs the fused graph); the vision graph and the key graph stay
    fp32. -> bytes before / after and (``check``) the effect vs PyTorch fp32 on the probe."""
    import dataclasses

    import onnx

    from edgekv.export.decoder_graph import WEIGHT_FORMATS, quantize_linears
    from edgekv.export.onnx_export import files_bytes, onnx_files

    path = os.path.join(folder, DECODER_EMBEDS_FILE)
    before = onnx_files(folder, DECODER_EMBEDS_FILE)
    info: dict = {"fp32_bytes": files_bytes(folder, before)}
    model = onnx.load(path)
    fmt = dataclasses.replace(WEIGHT_FORMATS[weights], smooth_alpha=None)
    info["linears"] = quantize_linears(model, fmt)
    for name in before:
        os.unlink(os.path.join(folder, name))
    big = model.ByteSize() > (1 << 31) - (1 << 24)  # protobuf's 2 GB limit, with room
    onnx.save_model(model, path, save_as_external_data=big, location=DECODER_EMBEDS_FILE + ".data")
    info["bytes"] = files_bytes(folder, onnx_files(folder, DECODER_EMBEDS_FILE))
    if check:
        info["check"] = vlm_logits_vs_torch(bb, folder, proc_dict)
    return info


def vlm_logits_vs_torch(bb: Any, folder: str, proc_dict: dict) -> dict:
    """The exported graphs' logits vs PyTorch's on the probe, without and with past: max |diff|
    and top-1 agreement of each."""
    import numpy as np
    import torch

    from edgekv.runtime.multimodal import EncodedImage, MultimodalModel
    from edgekv.runtime.vision import ImageProcessorConfig, preprocess

    tid, tokens = bb.vision.token_id, bb.vision.tokens
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
    return {"max_abs_diff_no_past": float(np.abs(whole[0] - joint).max()),
            "max_abs_diff_with_past": float(np.abs(tail[0] - joint[split:]).max()),
            "top1_no_past": float(np.mean(whole[0].argmax(-1) == joint.argmax(-1))),
            "top1_with_past": float(np.mean(tail[0].argmax(-1) == joint[split:].argmax(-1))),
            "logit_scale": float(np.abs(joint).max()), "num_tokens": len(ids),
            "num_image_tokens": int(img.features.shape[1])}


# --- the whole export ----------------------------------------------------------------------
def export_vlm_into(model: str, folder: str, opts: ExportOptions, stages: Any) -> dict:
    """The VLM counterpart of ``pipeline._export_into``: same stages, options and manifest, plus
    the vision graph, the embeddings table and the manifest's ``vision`` section."""
    from edgekv.export.onnx_export import KEY_FILE, export_embeds_key_graph, files_bytes, onnx_files
    from edgekv.manifest import file_hashes, write_manifest
    from edgekv.runtime.vision import ImageProcessorConfig

    spec = memory_spec(opts.memory) if opts.memory else None
    with stages.stage("load"):
        bb, proc = load_vlm(model)
        proc_cfg = ImageProcessorConfig.from_hf(proc.to_dict())
    if spec is not None:
        check_memory(spec, opts.memory, bb, opts.key_layer)
    key = resolve_key(bb, opts, spec)
    token_text, token_id = bb.vision.image_token, bb.vision.token_id
    with stages.stage("vision"):
        from edgekv.runtime.vision import preprocess

        pixels = preprocess(probe_image(), proc_cfg).pixel_values
        export_vision(bb, tuple(pixels.shape[1:]), os.path.join(folder, VISION_FILE), opts.opset)
        save_embeddings(bb, os.path.join(folder, EMBEDDINGS_FILE))
        vision_names = [*onnx_files(folder, VISION_FILE), EMBEDDINGS_FILE]
    with stages.stage("decoder"):
        export_embeds_decoder(bb, os.path.join(folder, DECODER_EMBEDS_FILE), opts.opset)
        decoder_names = onnx_files(folder, DECODER_EMBEDS_FILE)
    summary: dict = {"decoder": {"weights": opts.quantize_weights or "fp32", "bytes": files_bytes(folder, decoder_names)}}
    if opts.check:
        with stages.stage("check"):
            summary["decoder"]["fp32_check"] = check_vlm(bb, folder, proc.to_dict())
    if opts.quantize_weights:
        with stages.stage("quantise"):
            summary["decoder"]["quantised"] = quantise_vlm_decoder(bb, folder, proc.to_dict(), opts.quantize_weights,
                                                                   opts.check)
            decoder_names = onnx_files(folder, DECODER_EMBEDS_FILE)
    with stages.stage("key graph"):
        # the key on token embeddings: image positions hold the vision features (docs/multimodal.md)
        export_embeds_key_graph(bb.decoder, key[0], key[1], os.path.join(folder, KEY_FILE), opts.opset)
        key_names = onnx_files(folder, KEY_FILE)
    tokenizer, index, names = tokenizer_and_index(bb, folder, opts.memory, stages)
    with stages.stage("manifest"):
        names = [*decoder_names, *vision_names, *key_names, *names]
        data = manifest_data(bb, key, opts.quantize_weights or "fp32", tokenizer, file_hashes(folder, names), index)
        data["decoder"]["file"] = DECODER_EMBEDS_FILE
        data["key"]["input"] = KEY_INPUT_EMBEDS
        tokens = bb.vision.tokens
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
