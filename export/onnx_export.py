"""The ONNX graphs the device runs: the decoder with past, the retrieval-key graph, weights.

Two ways to write the decoder:

* ``export_fused`` (the default) — edgekv's own graphs (:mod:`edgekv.export.decoder_graph`):
  fused contrib ops, GroupQueryAttention with a shared past/present buffer, fp32 or
  weight-only block-wise int8 / int4 (``MatMulNBits``), and a ``key.onnx`` that reads the
  same weights. Both graphs keep their initializers in one file, ``model.onnx.data``.
  optimum's ``config.json`` / ``generation_config.json`` are written next to them, and the
  interface is optimum's, so ``ORTModelForCausalLM`` opens the folder too.
* ``export_decoder`` / ``export_key_graph`` (``--graph optimum``, fp32) — what follows:

* ``model.onnx`` — optimum's ``text-generation-with-past`` export of the causal LM, fp32,
  in optimum's folder layout (``model.onnx`` + ``config.json`` + ``generation_config.json``)
  so ``ORTModelForCausalLM`` can open the folder too. Inputs ``input_ids`` [B, S],
  ``attention_mask`` [B, P+S], ``position_ids`` [B, S], ``past_key_values.{l}.key|value``
  [B, H, P, D]; outputs ``logits`` [B, S, V], ``present.{l}.key|value`` [B, H, P+S, D].
* ``key.onnx`` — :class:`edgekv.host.keymodel.KeyModel` (the first ``key_layer`` layers
  and the pooling), traced with ``torch.onnx.export(dynamo=False)`` under optimum's model
  patcher so that mask creation traces; dynamic batch and sequence axes.
* (issue 3 quantised optimum's graph with ``quantize_dynamic``; activation outliers cost it
  top-1 agreement, ~0.7 on SmolLM2: ``export_fused``'s weight-only formats replace it, see
  docs/performance.md.)

Exports run quietly (tracer warnings and library logs silenced) and deterministically
(fixed seed, no validation inputs drawn into the graph).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

from edgekv.atomic import publish_file
from edgekv.errors import InputError

DECODER_FILE = "model.onnx"
KEY_FILE = "key.onnx"
WEIGHTS_FILE = "model.onnx.data"  # initializers of both fused graphs (each tensor once)
DECODER_TASK = "text-generation-with-past"
DEFAULT_OPSET = 18
# What optimum writes next to model.onnx that belongs to the optimum folder layout.
OPTIMUM_CONFIG_FILES = ("config.json", "generation_config.json")
_QUIET_LOGGERS = ("optimum", "transformers", "torch.onnx", "onnxruntime", "root")


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence tracer/exporter warnings, library logs and stray prints; seed torch."""
    import torch

    saved = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # TracerWarning, aten::index UserWarning, deprecations
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        torch.manual_seed(0)
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


def onnx_files(folder: str, name: str) -> list[str]:
    """``name`` and the external-data files its initializers point to (relative names)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load(os.path.join(folder, name), load_external_data=False)
    extra = set()
    for tensor in proto.graph.initializer:
        if uses_external_data(tensor):
            extra.update(e.value for e in tensor.external_data if e.key == "location")
    return [name, *sorted(extra)]


def files_bytes(folder: str, names: list[str]) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names)


# --- decoder with past ------------------------------------------------------------
class _PositionIdsInput:
    """Mixin for an optimum decoder config: add the ``position_ids`` input [B, S].

    Some families (Gemma) are exported by optimum without it; edgekv's runtime assigns
    positions itself (memory at 0..T-1, the prompt after it), so the graph must take them.
    """

    @property
    def inputs(self) -> dict:
        inputs = super().inputs  # type: ignore[misc]
        inputs["position_ids"] = {0: "batch_size", 1: "sequence_length"}
        return inputs


def optimum_exports(family: str) -> bool:
    """Whether optimum's ONNX exporter has a decoder-with-past config for the transformers
    ``model_type`` ``family`` (what ``export_decoder`` needs)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(family, exporter="onnx", library_name="transformers")
    except KeyError:
        return False
    return DECODER_TASK in tasks


def _decoder_onnx_configs(model: Any) -> dict:
    """``custom_onnx_configs`` for optimum: {} when its config already takes position_ids."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        ctor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=model, task=DECODER_TASK, library_name="transformers")
    except (KeyError, ValueError) as e:
        raise InputError(f"optimum cannot export {model.config.model_type!r} decoders ({e})") from None
    config = ctor(model.config)
    if "position_ids" in config.inputs:
        return {}
    cls = type(f"{type(config).__name__}WithPositionIds", (_PositionIdsInput, type(config)), {})
    return {"model": cls(model.config, task=config.task, use_past=True, use_past_in_inputs=True)}


def export_decoder(model: Any, out_dir: str, opset: int = DEFAULT_OPSET) -> list[str]:
    """Export the causal LM as optimum's decoder with past into ``out_dir``.

    Only the graph (``model.onnx`` and any external data) and optimum's config files are
    kept; the tokenizer files optimum copies from the source folder are left behind
    (edgekv writes its own). Returns the ONNX file names (graph first).
    """
    from optimum.exporters.onnx import onnx_export_from_model

    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".decoder-") as scratch, quiet_export():
        try:
            onnx_export_from_model(model, output=scratch, task=DECODER_TASK, opset=opset, do_validation=False,
                                   device="cpu", custom_onnx_configs=_decoder_onnx_configs(model))
        except ValueError as e:  # optimum: unsupported architecture / task
            raise InputError(f"optimum cannot export this model ({str(e).splitlines()[0][:200]})") from None
        names = onnx_files(scratch, DECODER_FILE)
        for name in [*names, *OPTIMUM_CONFIG_FILES]:
            if os.path.isfile(os.path.join(scratch, name)):
                publish_file(os.path.join(scratch, name), os.path.join(out_dir, name))
    return names


# --- retrieval-key graph ----------------------------------------------------------
def _dummy_key_inputs(vocab_size: int) -> tuple[Any, Any]:
    """Two right-padded prompts, so the traced graph builds the padding mask (never skips it)."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, 7), generator=g, dtype=torch.int64)  # [B, S]
    mask = torch.ones(2, 7, dtype=torch.int64)
    mask[1, 4:] = 0
    return ids, mask


@contextlib.contextmanager
def optimum_patches(config: Any, module: Any, task: str = "feature-extraction",
                    restore: Any = None) -> Iterator[None]:
    """Enter optimum's ONNX model patcher for ``config``'s model type and ``task`` around ``module``.

    The patcher registers the vmap-free mask functions (``sdpa_mask_without_vmap``), the
    packed-sequence and cache-layer fixes and the ONNX-compatible op replacements that
    optimum applies to decoders in this transformers version. It also sets
    ``config.use_cache`` on every submodule, so the original values of ``restore``'s
    submodules (default: ``module``'s) are put back after.
    """
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        ctor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model_type=config.model_type, task=task, library_name="transformers")
    except (KeyError, ValueError) as e:
        raise InputError(f"optimum has no ONNX config ({task}) for {config.model_type!r} models ({e})") from None
    onnx_config = ctor(config)
    saved = [(m.config, m.config.use_cache) for m in (module if restore is None else restore).modules()
             if hasattr(m, "config") and hasattr(m.config, "use_cache")]
    try:
        with onnx_config.patch_model_for_export(module):
            yield
    finally:
        for cfg, value in saved:
            cfg.use_cache = value


def export_key_graph(model: Any, decoder: Any, key_layer: int, pooling: str, path: str,
                     opset: int = DEFAULT_OPSET) -> None:
    """Write ``KeyModel(decoder, key_layer, pooling)`` to ``path``.

    Inputs ``input_ids`` [B, S] int64 and ``attention_mask`` [B, S] int64 (right padding,
    1 = token); output ``pooled`` [B, hidden] float32 (raw; projection and unit norm are
    applied in numpy by the caller).
    """
    import torch

    from edgekv.host.keymodel import KeyModel

    key_model = KeyModel(decoder, key_layer, pooling).eval()
    inputs = _dummy_key_inputs(int(model.config.vocab_size))
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"}, "pooled": {0: "batch_size"}}
    with quiet_export(), optimum_patches(model.config, key_model, restore=model), torch.no_grad():
        torch.onnx.export(key_model, inputs, path, dynamo=False, opset_version=opset,
                          input_names=["input_ids", "attention_mask"], output_names=["pooled"],
                          dynamic_axes=axes, do_constant_folding=True)


def export_embeds_key_graph(decoder: Any, key_layer: int, pooling: str, path: str,
                            opset: int = DEFAULT_OPSET) -> None:
    """Write ``EmbedsKeyModel(decoder, key_layer, pooling)`` to ``path`` (vision-language models).

    Inputs ``inputs_embeds`` [B, S, hidden] float32 (image positions already hold the vision
    features) and ``attention_mask`` [B, S] int64 (right padding); output ``pooled`` [B, hidden].
    """
    import torch

    from edgekv.host.keymodel import EmbedsKeyModel

    key_model = EmbedsKeyModel(decoder, key_layer, pooling).eval()
    _, mask = _dummy_key_inputs(2)
    embeds = torch.randn(*mask.shape, int(decoder.config.hidden_size), generator=torch.Generator().manual_seed(0))
    axes = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "sequence_length"}, "pooled": {0: "batch_size"}}
    with quiet_export(), optimum_patches(decoder.config, key_model, restore=decoder), torch.no_grad():
        torch.onnx.export(key_model, (embeds, mask), path, dynamo=False, opset_version=opset,
                          input_names=["inputs_embeds", "attention_mask"], output_names=["pooled"],
                          dynamic_axes=axes, do_constant_folding=True)


# --- edgekv's fused graphs -----------------------------------------------------------
def _calibration_tokenizer(model: Any, tokenizer: Any) -> Any:
    """``tokenizer``, else the one saved with the model's folder (``model.name_or_path``)."""
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    source = str(getattr(model, "name_or_path", "") or "")
    try:
        with quiet_export():
            return AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"activation smoothing calibrates on built-in texts and needs the model's tokenizer, "
                         f"which {source or 'the model'} does not provide ({str(e).splitlines()[0][:120]}); "
                         f"pass tokenizer= to export_fused") from None


def export_fused(model: Any, rope: Any, key_layer: int, pooling: str, out_dir: str, weights: Any = "fp32",
                 tokenizer: Any = None) -> dict:
    """Write the fused decoder, the key graph and their shared weights file into ``out_dir``.

    ``weights``: "fp32", "int8" or "int4" (:data:`edgekv.export.decoder_graph.WEIGHT_FORMATS`), or
    a :class:`~edgekv.export.decoder_graph.WeightFormat` itself.
    A format with ``smooth_alpha`` (int8) calibrates activation maxima once in PyTorch on
    ``decoder_graph.CALIBRATION_TEXTS`` (tokenised by ``tokenizer``, else the model folder's)
    and folds the same smoothing into both graphs.
    Returns {"decoder": [files], "key": [files], "stats": node counts and op types,
    "row_tables": the tables both graphs read only by row (for the manifest)}.
    """
    from edgekv.export.decoder_graph import (
        WEIGHT_FORMATS,
        build_decoder_graph,
        build_key_graph,
        calibrate_activations,
        calibration_ids,
        graph_stats,
        save_graphs,
    )

    fmt = WEIGHT_FORMATS[weights] if isinstance(weights, str) else weights
    os.makedirs(out_dir, exist_ok=True)
    act_max = None
    if fmt.smooth_alpha is not None:
        act_max = calibrate_activations(model, calibration_ids(_calibration_tokenizer(model, tokenizer)))
    decoder = build_decoder_graph(model, rope, fmt, act_max)
    key = build_key_graph(model, rope, key_layer, pooling, fmt, act_max)
    stats = {"decoder": graph_stats(decoder), "key": graph_stats(key)}
    saved = save_graphs(decoder, key, out_dir, DECODER_FILE, KEY_FILE, WEIGHTS_FILE)
    model.config.save_pretrained(out_dir)  # optimum's folder layout: config.json (+ generation_config.json)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return {"decoder": [DECODER_FILE, WEIGHTS_FILE], "key": [KEY_FILE, WEIGHTS_FILE], "stats": stats,
            "row_tables": saved["row_tables"]}


# --- export-time check against PyTorch ----------------------------------------------
def _torch_reference(model: Any, ids: list[int], split: int) -> tuple[Any, list, list]:
    """Logits [S, V] of ``ids`` as one sequence, and K, V per layer [1, H, split, D] of ids[:split]."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        joint = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        # a plain DynamicCache keeps every position (the model's own drops what its windowed layers no longer see)
        cache = model(input_ids=torch.tensor([ids[:split]]), past_key_values=DynamicCache(),
                      use_cache=True).past_key_values
    if hasattr(cache, "layers"):
        kv = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        kv = list(zip(cache.key_cache, cache.value_cache, strict=True))
    return joint, [k.float().numpy() for k, _ in kv], [v.float().numpy() for _, v in kv]


def _ort_logits(sess: Any, ids: list[int], past_k: list, past_v: list) -> Any:
    """Decoder logits [S, V] for ``ids`` after the past K, V (per layer [1, H, P, D])."""
    import numpy as np

    past = past_k[0].shape[2]
    feed = {"input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, past + len(ids)), np.int64),
            "position_ids": np.arange(past, past + len(ids), dtype=np.int64)[None]}
    for i, (k, v) in enumerate(zip(past_k, past_v, strict=True)):
        feed[f"past_key_values.{i}.key"] = np.ascontiguousarray(k, np.float32)
        feed[f"past_key_values.{i}.value"] = np.ascontiguousarray(v, np.float32)
    return sess.run(["logits"], feed)[0][0]


def check_decoder(model: Any, path: str, ids: list[int], split: int, threads: int | None = None) -> dict:
    """Compare the exported decoder with PyTorch on ``ids`` (prefix = ids[:split]).

    ``no_past``: all ids in one call. ``with_past``: ids[split:] after the PyTorch KV of
    the prefix (the injection the runtime does), against ids as one PyTorch sequence.
    Returns max |diff| of the logits for both, the argmax agreement (fraction of
    positions whose top token matches) and the largest |logit| of PyTorch.
    """
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    joint, pk, pv = _torch_reference(model, ids, split)
    empty = [np.zeros((1, k.shape[1], 0, k.shape[3]), np.float32) for k in pk]
    whole = _ort_logits(sess, ids, empty, empty)
    tail = _ort_logits(sess, ids[split:], pk, pv)
    got = np.concatenate([whole[:split], tail])
    return {
        "max_abs_diff_no_past": float(np.abs(whole - joint).max()),
        "max_abs_diff_with_past": float(np.abs(tail - joint[split:]).max()),
        "argmax_agreement": float(np.mean(got.argmax(-1) == joint.argmax(-1))),
        "logit_scale": float(np.abs(joint).max()),
        "num_tokens": len(ids),
    }
