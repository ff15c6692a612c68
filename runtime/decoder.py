"""The exported decoder (``model.onnx``, optimum's text-generation-with-past layout) in onnxruntime.

Inputs: ``input_ids`` [B, S], ``attention_mask`` [B, P+S], ``position_ids`` [B, S] (when the
graph has it), ``past_key_values.{l}.key|value`` [B, H, P, D]. Outputs: ``logits``
[B, S, V], ``present.{l}.key|value`` [B, H, P+S, D].
"""

from __future__ import annotations

import os

import numpy as np

from edgekv.errors import CorruptFileError, InputError

Past = list[tuple[np.ndarray, np.ndarray]]  # per layer: K, V [1, H, P, D] float32


def session_options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def open_session(path: str, threads: int | None):
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise InputError(f"{path}: missing from the artifacts; re-export the model")
    try:
        return ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception classes
        raise CorruptFileError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None


class DecoderSession:
    def __init__(self, path: str, num_layers: int, num_kv_heads: int, head_dim: int, threads: int | None = None):
        self.sess = open_session(path, threads)
        names = {i.name for i in self.sess.get_inputs()}
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(num_layers)]
        self.present_names = [(f"present.{i}.key", f"present.{i}.value") for i in range(num_layers)]
        missing = [n for pair in self.past_names for n in pair if n not in names] + \
                  [n for n in ("input_ids", "attention_mask") if n not in names]
        if missing:
            raise CorruptFileError(f"{path}: not a decoder-with-past graph edgekv understands (missing inputs {missing[:3]})")
        self.has_position_ids = "position_ids" in names
        self.output_names = ["logits"] + [n for pair in self.present_names for n in pair]

    def empty_past(self) -> Past:
        z = np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32)
        return [(z, z) for _ in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """input_ids: [1, S] int64; past: P positions -> logits [1, S, V], present (P+S positions)."""
        past_len = past[0][0].shape[2]
        seq = input_ids.shape[1]
        feed = {"input_ids": input_ids.astype(np.int64),
                "attention_mask": np.ones((1, past_len + seq), np.int64)}
        if self.has_position_ids:
            feed["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]
        for (kn, vn), (k, v) in zip(self.past_names, past, strict=True):
            feed[kn] = k
            feed[vn] = v
        out = self.sess.run(self.output_names, feed)
        present = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]
        return out[0], present


def past_from_memory(K: np.ndarray, V: np.ndarray) -> Past:
    """K, V: [L, H, T, D] -> per-layer [1, H, T, D] views."""
    return [(K[i][None], V[i][None]) for i in range(K.shape[0])]
