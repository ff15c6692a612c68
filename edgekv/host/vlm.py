"""Vision-language backbones on the host: families, image tokens, the vision encoder and the
image path of a loaded VLM (:class:`ImageInputs`, ``Backbone.vision``).

Everything here reproduces what the device runtime does with an image
(:mod:`edgekv.runtime.multimodal`), in torch, so entries, keys and losses built on the host
are the functions the device computes:

* preprocessing: :func:`edgekv.runtime.vision.preprocess` (the same numpy code);
* features: the vision encoder (:func:`vision_encoder`: tower + projector, the module
  ``vision.onnx`` is traced from), cached per image path for the lifetime of the
  :class:`ImageInputs`;
* prompt text: the chat template with one image token (list content ``{"type": "image"}``
  when the template places it, else ``"<image>\\n" + prompt``), the token expanded by
  :class:`edgekv.runtime.multimodal.ImageTokens`;
* embeddings: rows of the input embedding table, image positions replaced by the features;
* retrieval key: the key layers over the embeddings of the *plain* ``"<image>\\n" + prompt``
  (expanded, tokenizer specials, no chat template) — the text key's contract with the image
  in front.

Loading (``load_vlm``, ``load_backbone``) is in :mod:`edgekv.host.models`; torch is imported
on first use, so reading a model folder's family (:func:`vlm_type`) needs no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgekv.errors import InputError
from edgekv.host.tokens import has_chat_template, pad_batch, token_ids
from edgekv.runtime.multimodal import EncodedImage, ImageTokens
from edgekv.runtime.vision import ImageProcessorConfig, preprocess

if TYPE_CHECKING:
    import torch

# model_type -> (transformers class, image token attribute of the config)
VLM_TYPES = {"llava": ("LlavaForConditionalGeneration", "image_token_index"),
             "idefics3": ("Idefics3ForConditionalGeneration", "image_token_id"),
             "edgekv_tiny_vlm": ("TinyVLM", "image_token_index")}  # edgekv/host/tiny_vlm.py (our own class)
TINY_VLM = "edgekv_tiny_vlm"
# Built-in vision-language models: name -> VLM family (VLM_TYPES), built on first use.
VLM_BUILTINS = {"tiny-vlm": TINY_VLM}


def vlm_type(model: str) -> str | None:
    """The VLM family of a model folder or built-in VLM name (``None`` for anything else); reads config.json only."""
    if isinstance(model, str) and model in VLM_BUILTINS:
        return VLM_BUILTINS[model]
    path = os.path.join(model, "config.json") if isinstance(model, str) and os.path.isdir(model) else None
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return None
    return model_type if model_type in VLM_TYPES else None


# --- image tokens -----------------------------------------------------------------------
def image_token(model: Any, tokenizer: Any, source: str = "") -> tuple[str, int]:
    """(image token text, id) of a VLM; the tokenizer must encode it as one token."""
    tid = int(getattr(model.config, VLM_TYPES[model.config.model_type][1]))
    text = tokenizer.convert_ids_to_tokens(tid)
    if token_ids(tokenizer, text, False) != [tid]:
        raise InputError(f"{source or model.config.model_type}: the tokenizer does not encode the image token "
                         f"{text!r} as id {tid}")
    return text, tid


def image_tokens(model: Any, text: str) -> ImageTokens:
    """How the family writes an image (image token ``text``) into the prompt."""
    cfg = model.config
    if cfg.model_type == "idefics3":
        per_tile = int((cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 / cfg.scale_factor ** 2)
        return ImageTokens("idefics3", text, per_tile)
    return ImageTokens("llava" if cfg.model_type == TINY_VLM else cfg.model_type, text)  # tiny-vlm: N tokens


# --- the vision encoder -------------------------------------------------------------------
_ENCODER_CLASS: list = []


def _vision_encoder_class() -> type:
    """The torch module, defined on first use so importing this file needs no torch."""
    if _ENCODER_CLASS:
        return _ENCODER_CLASS[0]
    import torch

    class VisionEncoder(torch.nn.Module):
        """pixel_values [B, 3, h, w] -> image_features [B, N, hidden]: tower, layer/CLS selection, projector."""

        def __init__(self, vlm: Any):
            super().__init__()
            self.vlm = vlm
            if vlm.config.model_type == "idefics3":
                self.register_buffer("patch_positions", idefics3_patch_positions(vlm), persistent=False)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            if self.vlm.config.model_type == "idefics3":
                return self.idefics3(pixel_values)
            if self.vlm.config.model_type == TINY_VLM:  # MobileNetV2 grid -> projector
                return self.vlm.get_image_features(pixel_values)
            # LlavaModel.get_image_features without its final list() (which traces as a fixed-size Split)
            cfg, m = self.vlm.config, self.vlm.model
            hidden = m.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) \
                else [cfg.vision_feature_layer]
            drop_cls = cfg.vision_feature_select_strategy == "default"
            h = torch.cat([hidden[i][:, 1:] if drop_cls else hidden[i] for i in layers], dim=-1)
            return m.multi_modal_projector(h)  # [B, N, hidden]

        def idefics3(self, pixel_values: torch.Tensor) -> torch.Tensor:
            """Idefics3Model.get_image_features for full tiles (image_size x image_size, no padding):
            every patch is real, so the position ids are one constant row and no attention mask is
            needed (the per-image loop over patch masks would otherwise unroll into the graph)."""
            vm = self.vlm.model.vision_model
            x = vm.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [T, P, Dv]
            x = x + vm.embeddings.position_embedding(self.patch_positions)[None]
            h = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
            return self.vlm.model.connector(h)  # [T, P / scale^2, hidden]

    _ENCODER_CLASS.append(VisionEncoder)
    return VisionEncoder


def vision_encoder(vlm: Any) -> Any:
    """``VisionEncoder`` of ``vlm`` in eval mode: pixel_values [B, 3, h, w] -> image_features
    [B, N, hidden] (what ``vision.onnx`` is traced from)."""
    return _vision_encoder_class()(vlm).eval()


def idefics3_patch_positions(vlm: Any) -> Any:
    """Position ids [P] of a full tile, computed as Idefics3VisionEmbeddings does: bucketised
    fractional coordinates (which, through its ``* (1 - 1e-6)``, are not simply 0..n-1)."""
    import torch

    n = vlm.model.vision_model.embeddings.num_patches_per_side
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    frac = torch.arange(n, dtype=torch.float32) / n * (1 - 1e-6)
    b = torch.bucketize(frac, boundaries, right=True)
    return (b[:, None] * n + b).flatten()


# --- the image path of a loaded VLM ------------------------------------------------------------
class ImageInputs:
    """Image features, prompt ids and embeddings of a VLM backbone, as the device computes them."""

    def __init__(self, encoder: Any, table: Any, tokens: ImageTokens, token_id: int,
                 processor: ImageProcessorConfig):
        self.encoder = encoder  # pixel_values [T, 3, h, w] -> [T, n, hidden]
        self.table = table  # the input embedding (token ids -> [.., hidden])
        self.tokens = tokens
        self.token_id = int(token_id)
        self.processor = processor
        self._cache: dict[str, tuple[EncodedImage, torch.Tensor]] = {}

    @staticmethod
    def build(model: Any, tokenizer: Any, processor: Any, source: str = "") -> ImageInputs:
        """The image path of ``model`` (a loaded VLM), its tokenizer and Hugging Face image processor."""
        text, tid = image_token(model, tokenizer, source)
        return ImageInputs(vision_encoder(model), model.get_input_embeddings(), image_tokens(model, text), tid,
                           ImageProcessorConfig.from_hf(processor.to_dict()))

    @property
    def image_token(self) -> str:
        return self.tokens.image_token

    # --- images -----------------------------------------------------------------------
    def image(self, path: str) -> tuple[EncodedImage, torch.Tensor]:
        """(encoded image with its tile grid, features [N, hidden]) of ``path``; cached per path."""
        import torch

        if path not in self._cache:
            if not os.path.isfile(path):
                raise InputError(f"image {path} not found (image paths are relative to the data file's folder)")
            pre = preprocess(path, self.processor)
            with torch.no_grad():
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
            return self._check(token_ids(tokenizer, self.expand(f"{self.image_token}\n{prompt}", path), True), path)
        text = tokenizer.apply_chat_template([self._user(tokenizer, prompt)], tokenize=False,
                                             add_generation_prompt=True)
        return self._check(token_ids(tokenizer, self.expand(text, path), False), path)

    def key_ids(self, tokenizer, prompt: str, path: str) -> list[int]:
        """Tokens the retrieval key pools for an image + ``prompt``: the plain ``"<image>\\n" + prompt``
        expanded, with the tokenizer's specials (the runtime's ``prompt_ids(..., chat=False)``);
        text-only prompts pool ``tokenizer(prompt)`` (``edgekv.induce.entries.key_ids``)."""
        self._user(tokenizer, prompt)  # refuses a prompt holding the image token
        return self._check(token_ids(tokenizer, self.expand(f"{self.image_token}\n{prompt}", path), True), path)

    def conversation_ids(self, tokenizer, prompt: str, answer: str, path: str,
                         eos_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(the query as :meth:`query_ids` feeds it, the whole conversation [user: image + prompt,
        assistant: answer]) of an example with an image."""
        q = self.query_ids(tokenizer, prompt, path)
        if has_chat_template(tokenizer):
            text = tokenizer.apply_chat_template([self._user(tokenizer, prompt),
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            full = self._check(token_ids(tokenizer, self.expand(text, path), False), path)
        else:
            text = self.expand(f"{self.image_token}\n{prompt}", path) + "\n" + answer
            full = self._check(token_ids(tokenizer, text, True), path) + list(eos_ids[:1])
        return q, full

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
        ids = token_ids(tokenizer, text, special)
        n = sum(int(self.image(p)[1].shape[0]) for p in images)
        if sum(1 for t in ids if t == self.token_id) != n:
            raise InputError(f"the tokenizer does not keep the {n} image tokens of the chat apart")
        return ids, images

    # --- embeddings -------------------------------------------------------------------------
    def embed_images(self, ids: Sequence[int], images: Sequence[str]) -> torch.Tensor:
        """Embeddings [1, S, hidden] of one sequence whose image-token runs hold the features
        of ``images`` in order (several images, as :meth:`chat_ids` lays them out)."""
        import torch

        x = torch.as_tensor([list(ids)], dtype=torch.long)
        with torch.no_grad():
            embeds = self.table(x).float()  # [1, S, hidden]
            if images:
                feats = torch.cat([self.image(p)[1] for p in images])  # [N, hidden]
                at = (x[0] == self.token_id).nonzero().squeeze(1)
                if len(at) != feats.shape[0]:
                    raise InputError(f"{len(at)} image tokens in the sequence but {feats.shape[0]} image features")
                embeds[0, at] = feats
        return embeds

    def embed_batch(self, id_lists: Sequence[Sequence[int]], images: Sequence[str | None]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded embeddings [B, S, hidden] (image positions hold the features of
        ``images[b]``) and the mask [B, S] of ``id_lists``."""
        import torch

        x, mask = pad_batch(id_lists)
        with torch.no_grad():
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
