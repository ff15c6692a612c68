"""edgekv.host: the host model layer that both the method and the exporter build on.

Loading a frozen backbone (:mod:`edgekv.host.models`: Hugging Face folders, GGUF files,
built-in names; vision-language models with their image path, :mod:`edgekv.host.vlm`),
the built-in ``tiny-vlm`` (:mod:`edgekv.host.tiny_vlm`), the retrieval-key function r(x)
(:mod:`edgekv.host.keymodel`) and token helpers (:mod:`edgekv.host.tokens`).

Layering: ``edgekv.induce`` (the method) and ``edgekv.export`` (the exporter) import this
package; it imports neither of them (tests/test_import_graph.py). Needs the ``[host]``
extra (torch, transformers); the modules import torch on first use where they can, so a
device install gets a readable error instead of an ImportError.
"""
