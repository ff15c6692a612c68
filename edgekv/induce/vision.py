"""Image+text examples on a vision-language backbone: the host side of the device's image path.

Everything here reproduces what the device runtime does with an image
(:mod:`edgekv.runtime.multimodal`), in torch, so entries, keys and losses built on the host
are the functions the device computes:

* preprocessing: :func:`edgekv.runtime.vision.preprocess` (the same numpy code);
* features: ``VisionEncoder`` of :mod:`edgekv.export.vlm` (the module ``vision.onnx`` is
  traced from), cached per image path for the lifetime of the :class:`ImageInputs`;
* prompt text: the chat template with one image token (list content ``{"type": "image"}``
  when the template places it, else ``"<image>\\n" + prompt``), the token expanded by
  :class:`edgekv.runtime.multimodal.ImageTokens`;
* embeddings: rows of the input embedding table, image positions replaced by the features;
* retrieval key: the key layers over the embeddings of the *plain* ``"<image>\\n" + prompt``
  (expanded, tokenizer specials, no chat template) — the text key's contract with the image
  in front. Text-only examples keep ``tokenizer(prompt)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from edgekv.data import Example
from edgekv.errors import InputError
from edgekv.induce.entries import Encoded, _ids, encode_ids, has_chat_template, key_ids
from edgekv.induce.torch_induction import pad_batch
from edgekv.runtime.multimodal import EncodedImage, ImageTokens
from edgekv.runtime.vision import ImageProcessorConfig, preprocess


def load_adapt_backbone(model: str) -> Any:
    """A text backbone (``load_backbone``) or, for a vision-language model, ``load_vlm`` with
    ``backbone.vision`` set to its :class:`ImageInputs`."""
    from edgekv.export.models import load_backbone
    from edgekv.export.vlm import load_vlm, vlm_type

    if vlm_type(model) is None:
        return load_backbone(model)
    bb, proc = load_vlm(model)
    bb.vision = ImageInputs.from_backbone(bb, proc)
    return bb


class ImageInputs:
    """Image features, prompt ids and embeddings of a VLM backbone, as the device computes them."""

    def __init__(self, encoder: torch.nn.Module, table: torch.nn.Module, tokens: ImageTokens, token_id: int,
                 processor: ImageProcessorConfig):
        self.encoder = encoder  # pixel_values [T, 3, h, w] -> [T, n, hidden]
        self.table = table  # the input embedding (token ids -> [.., hidden])
        self.tokens = tokens
        self.token_id = int(token_id)
        self.processor = processor
        self._cache: dict[str, tuple[EncodedImage, torch.Tensor]] = {}

    @staticmethod
    def from_backbone(bb: Any, proc: Any) -> ImageInputs:
        from edgekv.export.vlm import _modules, image_token, image_tokens

        vision_cls, _ = _modules()
        _, tid = image_token(bb)
        return ImageInputs(vision_cls(bb.model).eval(), bb.model.get_input_embeddings(), image_tokens(bb), tid,
                           ImageProcessorConfig.from_hf(proc.to_dict()))

    @property
    def image_token(self) -> str:
        return self.tokens.image_token

    # --- images -----------------------------------------------------------------------
    @torch.no_grad()
    def image(self, path: str) -> tuple[EncodedImage, torch.Tensor]:
        """(encoded image with its tile grid, features [N, hidden]) of ``path``; cached per path."""
        if path not in self._cache:
            if not os.path.isfile(path):
                raise InputError(f"image {path} not found (image paths are relative to the data file's folder)")
            pre = preprocess(path, self.processor)
            feats = self.encoder(torch.from_numpy(pre.pixel_values)).float()  # [T, n, hidden]
            feats = feats.reshape(-1, feats.shape[-1])  # [N, hidden], tiles in prompt order
            self._cache[path] = (EncodedImage(feats[None].numpy(), pre.rows, pre.cols), feats)
        return self._cache[path]

    def expand(self, text: str, path: str) -> str:
        """``text`` (with one image token) with the token replaced by the family's image text."""
        if text.count(self.image_token) != 1:
            raise InputError(f"expected one image token {self.image_token!r} in the prompt text")
        return text.replace(self.image_token, self.tokens.text(self.image(path)[0]), 1)

    # --- token ids ----------------------------------------------------------------------
    def _listed(self, tokenizer, prompt: str) -> bool:
        """Whether the template places the image itself (list content), as the runtime decides."""
        from jinja2 import TemplateError

        listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            text = tokenizer.apply_chat_template(listed, tokenize=False, add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError):  # a template that cannot render list content
            return False
        return text.count(self.image_token) == 1 and prompt in text

    def _user(self, tokenizer, prompt: str) -> dict:
        if self.image_token in prompt:
            raise InputError(f"the prompt {prompt[:40]!r} contains the image token {self.image_token!r}; "
                             f"give the image in the 'image' field and leave the token out")
        if self._listed(tokenizer, prompt):
            return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        return {"role": "user", "content": f"{self.image_token}\n{prompt}"}

    def _check(self, ids: list[int], path: str) -> list[int]:
        n = int(self.image(path)[1].shape[0])
        if sum(1 for t in ids if t == self.token_id) != n:
            raise InputError(f"the tokenizer does not keep the {n} image tokens of {path} apart")
        return ids

    def query_ids(self, tokenizer, prompt: str, path: str) -> list[int]:
        """The image + ``prompt`` turn as the runtime feeds it (chat template, generation prompt)."""
        if not has_chat_template(tokenizer):
            return self._check(_ids(tokenizer, self.expand(f"{self.image_token}\n{prompt}", path), True), path)
        text = tokenizer.apply_chat_template([self._user(tokenizer, prompt)], tokenize=False,
                                             add_generation_prompt=True)
        return self._check(_ids(tokenizer, self.expand(text, path), False), path)

    def key_ids(self, tokenizer, prompt: str, path: str | None) -> list[int]:
        """Tokens the retrieval key pools: ``tokenizer(prompt)``; with an image the plain
        ``"<image>\\n" + prompt`` expanded (the runtime's ``prompt_ids(..., chat=False)``)."""
        if path is None:
            return key_ids(tokenizer, prompt)
        self._user(tokenizer, prompt)  # refuses a prompt holding the image token
        return self._check(_ids(tokenizer, self.expand(f"{self.image_token}\n{prompt}", path), True), path)

    def encode(self, tokenizer, ex: Example, eos_ids: Sequence[int], prefix_len: int) -> Encoded:
        """Conversation tokens of an example with an image ([user: image + prompt, assistant: answer])."""
        q = self.query_ids(tokenizer, ex.prompt, ex.image)
        if has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template([self._user(tokenizer, ex.prompt),
                                                  {"role": "assistant", "content": ex.answer}], tokenize=False)
            full = self._check(_ids(tokenizer, self.expand(text, ex.image), False), ex.image)
        else:
            text = self.expand(f"{self.image_token}\n{ex.prompt}", ex.image) + "\n" + ex.answer
            full = self._check(_ids(tokenizer, text, True), ex.image) + list(eos_ids[:1])
        first_image = full.index(self.token_id)
        return encode_ids(q, full, eos_ids, min(prefix_len, first_image), ex.answer, ex.image)

    def chat_ids(self, tokenizer, turns: Sequence[tuple[str, str | None, str | None]]) -> tuple[list[int], list[str]]:
        """Tokens of a chat of user turns ``(prompt, image or None, answer)``, each answered
        except the last (answer None: the generation prompt follows), every image placed as
        :meth:`query_ids` places one and expanded; and the image paths in token order.
        One unanswered image turn gives exactly :meth:`query_ids`."""
        images = [img for _, img, _ in turns if img is not None]
        if has_chat_template(tokenizer):
            msgs = []
            for prompt, img, ans in turns:
                msgs.append(self._user(tokenizer, prompt) if img is not None else {"role": "user", "content": prompt})
                if ans is not None:
                    msgs.append({"role": "assistant", "content": ans})
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=turns[-1][2] is None)
            special = False
        else:
            text = "".join((f"{self.image_token}\n" if img is not None else "") + p + (f"\n{a}\n" if a is not None else "")
                           for p, img, a in turns)
            special = True
        parts = text.split(self.image_token)
        if len(parts) != len(images) + 1:
            raise InputError(f"expected {len(images)} image tokens {self.image_token!r} in the chat text, "
                             f"found {len(parts) - 1}; leave the token out of prompts")
        text = parts[0] + "".join(self.tokens.text(self.image(p)[0]) + rest for p, rest in zip(images, parts[1:],
                                                                                                  strict=True))
        ids = _ids(tokenizer, text, special)
        n = sum(int(self.image(p)[1].shape[0]) for p in images)
        if sum(1 for t in ids if t == self.token_id) != n:
            raise InputError(f"the tokenizer does not keep the {n} image tokens of the chat apart")
        return ids, images

    @torch.no_grad()
    def embed_images(self, ids: Sequence[int], images: Sequence[str]) -> torch.Tensor:
        """Embeddings [1, S, hidden] of one sequence whose image-token runs hold the features
        of ``images`` in order (several images, as :meth:`chat_ids` lays them out)."""
        x = torch.as_tensor([list(ids)], dtype=torch.long)
        embeds = self.table(x).float()  # [1, S, hidden]
        if images:
            feats = torch.cat([self.image(p)[1] for p in images])  # [N, hidden]
            at = (x[0] == self.token_id).nonzero().squeeze(1)
            if len(at) != feats.shape[0]:
                raise InputError(f"{len(at)} image tokens in the sequence but {feats.shape[0]} image features")
            embeds[0, at] = feats
        return embeds

    # --- embeddings -------------------------------------------------------------------------
    @torch.no_grad()
    def embed_batch(self, id_lists: Sequence[Sequence[int]], images: Sequence[str | None]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded embeddings [B, S, hidden] (image positions hold the features of
        ``images[b]``) and the mask [B, S] of ``id_lists``."""
        x, mask = pad_batch(id_lists)
        embeds = self.table(x).float()  # [B, S, hidden]
        for b, path in enumerate(images):
            if path is None:
                continue
            feats = self.image(path)[1]  # [N, hidden]
            at = (x[b, : len(id_lists[b])] == self.token_id).nonzero().squeeze(1)
            if len(at) != feats.shape[0]:
                raise InputError(f"{len(at)} image tokens in the sequence but {feats.shape[0]} features of {path}")
            embeds[b, at] = feats
        return embeds, mask
