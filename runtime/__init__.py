"""edgekv.runtime: the device side. numpy + onnxruntime + hnswlib + tokenizers; never torch.

Nothing imported from here (directly or through ``edgekv`` core) may import torch,
transformers or optimum; ``tests/test_import_boundary.py`` enforces it.
"""

from edgekv.runtime.runtime import GenerationResult, Retrieved, Runtime, RuntimeConfig

__all__ = ["GenerationResult", "Retrieved", "Runtime", "RuntimeConfig"]
