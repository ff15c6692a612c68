"""InduceKV on the host (torch): entries, retrieval-weighted induction, calibration, selection.

Host only: importing this package needs the ``[host]`` extra (torch, transformers).
"""
