"""edgekv.export: the host side that turns a Hugging Face backbone into device artifacts.

Needs the ``[host]`` extra (torch, transformers, optimum, optimum-onnx).
"""
