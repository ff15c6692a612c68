"""Greedy answers of examples in PyTorch, with a memory file or without: the evaluation helper.

:func:`answer_examples` answers each :class:`~edgekv.data.Example` (with or without an
image) the way the device runtime does: the retrieval key of the prompt (and image) through
the memory's projection, top-k by similarity, alpha = softmax(sim / tau), entries laid out
best-last with sqrt(k * alpha) and the value gates, the chat-templated query (image token
expanded, features spliced in) after them, greedy decoding to EOS or ``max_new_tokens``.
``memory_path=None``: the model alone. Used by the benchmarks and ``edgekv bench``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from edgekv.data import Example
from edgekv.errors import MismatchError


@dataclass(frozen=True)
class Answer:
    """One greedy answer: its text (special tokens skipped, stripped), the source ids of the
    retrieved entries in layout order (best last; [] without memory), the generated ids."""

    text: str
    retrieved: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


def answer_examples(backbone, examples: Sequence[Example], memory_path: str | None = None, top_k: int = 4,
                    max_new_tokens: int = 8, progress: bool = False, image_root: str | None = None) -> list[Answer]:
    """Greedy answers of ``examples`` with the memory at ``memory_path`` (None: no memory).

    ``backbone``: from :func:`edgekv.host.models.load_backbone` (examples with an image
    need a vision-language backbone); relative image paths are resolved against ``image_root``.
    """
    from tqdm.auto import tqdm

    from edgekv.data import resolve_images
    from edgekv.format import Memory
    from edgekv.host.keymodel import KeyModel
    from edgekv.induce.adapt import effective, read_bank
    from edgekv.induce.entries import example_keys, query_ids
    from edgekv.induce.torch_induction import Bank, Induction

    examples = resolve_images(examples, image_root)
    tok, eos = backbone.tokenizer, set(backbone.eos_token_ids)
    vision = getattr(backbone, "vision", None)
    q = None
    if memory_path is None:
        empty = Bank(np.zeros((0, backbone.shape.hidden_size), np.float32), torch.zeros(0), torch.zeros(0))
        ind, tau, gates = Induction(backbone.model, empty, torch.zeros((0, 1)), top_k, backbone.rope, vision), 1.0, []
    else:
        with Memory(memory_path) as mem:
            if mem.spec.model_fingerprint != backbone.fingerprint:
                raise MismatchError(f"{memory_path} was built for another model (fingerprint "
                                    f"{mem.spec.model_fingerprint[:12]}, this model {backbone.fingerprint[:12]})")
            bank, _ = read_bank(mem)
            spec, proj, cal = mem.spec, mem.projection, mem.calibration
        ind = Induction(backbone.model, bank, effective(bank.raw_keys, proj), top_k, spec.rope, vision)
        tau, gates = cal.tau, cal.gates
        key_model = KeyModel(backbone.decoder, spec.key_layer, spec.key_pooling)
        q = effective(example_keys(backbone, key_model, examples), proj)
    use_memory = q is not None and len(ind.bank) > 0
    out: list[Answer] = []
    for j, ex in enumerate(tqdm(examples, desc="answers", unit="ex", disable=not progress, leave=False)):
        image = ex.image if vision is not None else None
        ids = vision.query_ids(tok, ex.prompt, image) if image else query_ids(tok, ex.prompt)
        gen, idx = ind.generate(q[j] if q is not None else None, ids, tau, gates, max_new_tokens, eos,
                                use_memory=use_memory, image=image)
        retrieved = [] if idx is None else [ind.bank.source_ids[r] for r in idx.tolist()]
        out.append(Answer(tok.decode(gen, skip_special_tokens=True).strip(), retrieved, gen))
    return out


def exact_match(answers: Sequence[Answer], examples: Sequence[Example]) -> float:
    """Share of answers whose text equals the example's answer (both stripped)."""
    if not examples:
        return 0.0
    return sum(a.text == ex.answer.strip() for a, ex in zip(answers, examples, strict=True)) / len(examples)
