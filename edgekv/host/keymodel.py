"""The retrieval-key function r(x) as a PyTorch module: one definition for host and graph.

``KeyModel`` runs only the first ``key_layer`` decoder layers of the frozen backbone and
pools their output over the prompt's tokens (mean over the attention mask, or the last
token). It returns the *raw* pooled hidden state; the memory's key projection and the
unit normalisation are applied in numpy (:func:`edgekv.retrieval.effective_keys`) on
both sides. ``edgekv export`` writes this module as ``key.onnx``; ``edgekv adapt``
computes stored keys with it, so stored and query keys are the same function.

Vision-language backbones use :meth:`KeyModel.forward_embeds` (graph: :class:`EmbedsKeyModel`,
input ``inputs_embeds``): the same layers over token embeddings whose image positions hold
the vision features, so the key of an image+text prompt covers the image.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def truncated_decoder(decoder: Any, num_layers: int) -> Any:
    """A view of ``decoder`` (the HF base model) running its first ``num_layers`` layers,
    with the final norm removed. Shares weights with the original; does not modify it."""
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    view._parameters = dict(decoder._parameters)
    view._buffers = dict(decoder._buffers)
    view.layers = torch.nn.ModuleList(list(decoder.layers[:num_layers]))
    view.norm = torch.nn.Identity()
    view.config = copy.deepcopy(decoder.config)
    view.config.num_hidden_layers = num_layers
    return view


def rare_weights(input_ids: torch.Tensor) -> torch.Tensor:
    """Weight of each token in ``rare`` pooling: log(1 + id) ** 2. [B, S] int -> [B, S] float32

    Byte-pair vocabularies number their tokens in merge order, which follows corpus frequency,
    so a token's id grows as it gets rarer and log(1 + id) tracks its self-information
    (Zipf: frequency ~ 1 / rank). A frozen property of the tokenizer: stored keys never go stale."""
    return torch.log1p(input_ids.to(torch.float32)) ** 2


def pool_hidden(h: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """h: [B, S, Hd], attention_mask: [B, S] (1 = token), input_ids: [B, S] (``rare`` only)
    -> [B, Hd] float32."""
    mask = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, S, 1]
    if pooling == "mean":
        return (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if pooling == "rare":
        if input_ids is None:
            raise ValueError("rare key pooling needs the token ids")
        w = mask * rare_weights(input_ids).to(h.dtype).unsqueeze(-1)  # [B, S, 1]
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-6)
    if pooling == "last":
        # index of the last 1 in each row (prompts are right-padded)
        idx = (attention_mask.long().cumsum(dim=1) == attention_mask.long().sum(dim=1, keepdim=True))
        idx = idx.long().argmax(dim=1)  # first position reaching the total = last token
        return h[torch.arange(h.shape[0]), idx]
    raise ValueError(f"unknown key pooling {pooling!r}")


class KeyModel(torch.nn.Module):
    """input_ids [B, S] int64, attention_mask [B, S] int64 -> pooled [B, hidden] float32."""

    def __init__(self, decoder: Any, key_layer: int, pooling: str = "mean"):
        super().__init__()
        self.body = truncated_decoder(decoder, key_layer)
        self.key_layer = key_layer
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return pool_hidden(out.last_hidden_state, attention_mask, self.pooling, input_ids)

    def forward_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds [B, S, hidden] float32, attention_mask [B, S] int64, input_ids [B, S] int64
        (the tokens the embeddings stand for, image positions included; ``rare`` pooling only)
        -> pooled [B, hidden] float32."""
        out = self.body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return pool_hidden(out.last_hidden_state, attention_mask, self.pooling, input_ids)


class EmbedsKeyModel(torch.nn.Module):
    """The graph form of :meth:`KeyModel.forward_embeds`: (inputs_embeds, attention_mask) -> pooled."""

    def __init__(self, decoder: Any, key_layer: int, pooling: str = "mean"):
        super().__init__()
        self.key = KeyModel(decoder, key_layer, pooling)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.key.forward_embeds(inputs_embeds, attention_mask)
