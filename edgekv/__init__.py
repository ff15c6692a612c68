"""edgekv: fixed-footprint continual adaptation (InduceKV) for LLMs on edge devices.

The core package holds what both sides need as plain numpy: the memory file format
(:mod:`edgekv.format`), quantisation (:mod:`edgekv.quant`), RoPE rotation
(:mod:`edgekv.rope`) and retrieval weights (:mod:`edgekv.retrieval`). The host tools
need the ``[host]`` extra: the host model layer (``edgekv.host``: backbones, the key model)
and, built on it, the method (``edgekv.induce``) and the exporter (``edgekv.export``); the
method never imports the exporter (tests/test_import_graph.py). The device runtime
(``edgekv.runtime``) needs only numpy, onnxruntime, hnswlib and tokenizers.
"""

__version__ = "0.1.0"
