"""Token ids of the host tokenizer and right-padded batches of them.

Shared by the method (``edgekv.induce.entries``) and the vision-language inputs
(:class:`edgekv.host.vlm.ImageInputs`); torch is imported on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    """``tokenizer(text)`` as a list, with (``special``) or without the tokenizer's special tokens."""
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists. -> ids [B, S] long, mask [B, S] long (1 = token)."""
    import torch

    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
