"""The image path of the device runtime: preprocess -> vision.onnx -> splice -> decoder_embeds.onnx.

For artifacts with a ``vision`` section in ``manifest.json`` (``edgekv.export.vlm``):

1. the image is preprocessed in numpy + Pillow (:mod:`edgekv.runtime.vision`);
2. ``vision.onnx`` turns pixel values [1, 3, h, w] into image features [1, N, hidden];
3. the prompt is chat-templated with one image token, which is expanded to N copies
   (as Hugging Face's processors expand it in the text);
4. token ids are embedded with the memory-mapped table ``embed_tokens.npy``, and the N
   image positions take the image features in order;
5. ``decoder_embeds.onnx`` runs on the embeddings after the (memory) past, exactly like
   the text decoder; decoding continues with token embeddings.

:class:`EmbedsDecoderSession` has the text decoder's interface (``empty_past``,
``forward(input_ids, past)``), so the existing decode loop runs unchanged on VLM artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgekv.errors import CorruptFileError, InputError
from edgekv.runtime.decoder import Past, open_session, session_options
from edgekv.runtime.vision import ImageProcessorConfig, preprocess


@dataclass(frozen=True)
class EncodedImage:
    features: np.ndarray  # [1, N, hidden] float32: all tiles' features, in prompt order
    rows: int = 0  # idefics3 tile grid (0, 0: one image, no tiles)
    cols: int = 0


@dataclass(frozen=True)
class ImageTokens:
    """How a family writes an image into the prompt text (before tokenisation)."""

    family: str  # "llava" | "idefics3"
    image_token: str = "<image>"
    tokens_per_tile: int = 0  # idefics3: image tokens per tile (image_seq_len)
    fake_token: str = "<fake_token_around_image>"  # idefics3
    global_token: str = "<global-img>"  # idefics3

    def text(self, image: EncodedImage) -> str:
        """The text that replaces the one image token of the templated prompt.

        llava: the image token once per feature (LlavaProcessor). idefics3: per tile
        ``<fake><row_r_col_c>`` + image tokens, a newline per row, then ``\n<fake><global-img>``
        + image tokens + ``<fake>`` (Idefics3Processor; without tiles only the global part,
        without the leading newline).
        """
        n = image.features.shape[1]
        if self.family == "llava":
            return self.image_token * n
        per, fake = self.tokens_per_tile, self.fake_token
        if per < 1 or n != per * (image.rows * image.cols + 1):
            raise InputError(f"{n} image features do not fill {image.rows}x{image.cols} tiles + 1 of {per} tokens")
        glob = f"{fake}{self.global_token}{self.image_token * per}{fake}"
        if image.rows == 0:
            return glob
        grid = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{self.image_token * per}" for c in range(image.cols))
                       + "\n" for r in range(image.rows))
        return f"{grid}\n{glob}"


class EmbedsDecoderSession:
    """``decoder_embeds.onnx``: inputs_embeds [1, S, hidden] + past -> logits, present."""

    def __init__(self, path: str, table: np.ndarray, num_layers: int, num_kv_heads: int, head_dim: int,
                 threads: int | None = None):
        self.sess = open_session(path, threads)
        self.table = table  # [V, hidden] float32 (memory-mapped)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(num_layers)]
        names = {i.name for i in self.sess.get_inputs()}
        missing = [n for n in ("inputs_embeds", "attention_mask", "position_ids") if n not in names] + \
                  [n for pair in self.past_names for n in pair if n not in names]
        if missing:
            raise CorruptFileError(f"{path}: not a decoder-on-embeddings graph edgekv understands "
                                   f"(missing inputs {missing[:3]}); re-export the model")
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]

    def empty_past(self) -> Past:
        z = np.zeros((1, self.num_kv_heads, 0, self.head_dim), np.float32)
        return [(z, z) for _ in range(self.num_layers)]

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [1, S] -> embeddings [1, S, hidden] float32."""
        ids = np.asarray(input_ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.table.shape[0]):
            raise InputError(f"token id out of range of the embedding table ({self.table.shape[0]} rows)")
        return np.ascontiguousarray(self.table[ids], np.float32)

    def forward_embeds(self, embeds: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """embeds [1, S, hidden]; past: P positions -> logits [1, S, V], present (P+S positions)."""
        past_len, seq = past[0][0].shape[2], embeds.shape[1]
        feed = {"inputs_embeds": np.ascontiguousarray(embeds, np.float32),
                "attention_mask": np.ones((1, past_len + seq), np.int64),
                "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]}
        for (kn, vn), (k, v) in zip(self.past_names, past, strict=True):
            feed[kn], feed[vn] = k, v
        out = self.sess.run(self.output_names, feed)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.num_layers)]

    def forward(self, input_ids: np.ndarray, past: Past, last_only: bool = False) -> tuple[np.ndarray, Past]:
        """The text decoder's interface: input_ids [1, S] (embedded from the table). This graph
        has no ``logits_to_keep``: ``last_only`` is accepted and every row is returned."""
        return self.forward_embeds(self.embed(input_ids), past)


@dataclass
class MultimodalModel:
    """Vision graph + embeddings decoder + image-token bookkeeping for one export folder."""

    vision: object  # onnxruntime session of vision.onnx
    decoder: EmbedsDecoderSession
    image_token_id: int
    tokens: ImageTokens
    processor: ImageProcessorConfig | None = None

    @property
    def image_token(self) -> str:
        return self.tokens.image_token

    @staticmethod
    def open(folder: str, num_layers: int, num_kv_heads: int, head_dim: int, image_token_id: int,
             tokens: ImageTokens, threads: int | None = None, vision_file: str = "vision.onnx",
             decoder_file: str = "decoder_embeds.onnx", embeddings_file: str = "embed_tokens.npy",
             processor: ImageProcessorConfig | None = None) -> MultimodalModel:
        table_path = os.path.join(folder, embeddings_file)
        if not os.path.isfile(table_path):
            raise InputError(f"{table_path}: missing from the artifacts; re-export the model")
        try:
            table = np.load(table_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"{table_path}: not a valid embedding table ({str(e)[:160]}); "
                                   f"re-export the model") from None
        if table.ndim != 2 or table.dtype != np.float32:
            raise CorruptFileError(f"{table_path}: expected a [vocab, hidden] float32 table, got "
                                   f"{table.dtype} {table.shape}; re-export the model")
        decoder = EmbedsDecoderSession(os.path.join(folder, decoder_file), table, num_layers, num_kv_heads,
                                       head_dim, threads)
        vision = open_session(os.path.join(folder, vision_file), threads, session_options(threads, spin=False))
        return MultimodalModel(vision, decoder, int(image_token_id), tokens, processor)

    @staticmethod
    def from_manifest(folder: str, manifest: dict, threads: int | None = None) -> MultimodalModel:
        v = manifest["vision"]
        tokens = ImageTokens(v["family"], v["image_token"], int(v.get("tokens_per_tile") or 0),
                             v.get("fake_image_token") or "", v.get("global_image_token") or "")
        return MultimodalModel.open(folder, int(manifest["num_layers"]), int(manifest["num_kv_heads"]),
                                    int(manifest["head_dim"]), int(v["image_token_id"]), tokens, threads, v["file"],
                                    manifest["decoder"]["file"], v["embeddings"],
                                    ImageProcessorConfig.from_dict(v["processor"]))

    # --- pieces ------------------------------------------------------------------------
    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values [T, 3, h, w] (T tiles or 1 image) -> image features [1, T*n, hidden] float32."""
        (feats,) = self.vision.run(["image_features"], {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})
        return feats.reshape(1, -1, feats.shape[-1])

    def encode_image(self, image) -> EncodedImage:
        """A path or PIL image -> its features (and tile grid)."""
        pre = preprocess(image, self.processor)
        return EncodedImage(self.image_features(pre.pixel_values), pre.rows, pre.cols)

    def prompt_text(self, tokenizer, prompt: str, chat: bool) -> str:
        """The prompt text with exactly one image token where the image goes (chat-templated).

        Templates that take Hugging Face's list content ({"type": "image"}) place the image
        token themselves; otherwise the user turn is the image token, a newline and the prompt.
        """
        if not prompt or not prompt.strip():
            raise InputError("the prompt is empty")
        if self.image_token in prompt:
            raise InputError(f"the prompt contains the image token {self.image_token!r}; pass the image as the "
                             f"image argument and leave the token out")
        plain = f"{self.image_token}\n{prompt}"
        if not (chat and tokenizer.chat_template):
            return plain
        listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = tokenizer.render_chat(listed)
        if text.count(self.image_token) != 1 or prompt not in text:
            text = tokenizer.render_chat([{"role": "user", "content": plain}])
        return text

    def prompt_ids(self, tokenizer, prompt: str, chat: bool, image: EncodedImage) -> list[int]:
        """Token ids of an image + ``prompt`` turn, the image token expanded as the family's processor does."""
        text = self.prompt_text(tokenizer, prompt, chat)
        expanded = text.replace(self.image_token, self.tokens.text(image), 1)
        # a chat template carries its own specials; a plain prompt gets the tokenizer's (BOS)
        ids = tokenizer.encode(expanded, add_special_tokens=not (chat and tokenizer.chat_template))
        num = sum(1 for t in ids if t == self.image_token_id)
        if num != image.features.shape[1]:
            raise CorruptFileError(f"the tokenizer turned {image.features.shape[1]} image tokens into {num}; "
                                   f"re-export the model")
        return ids

    def embed(self, ids: list[int], features: np.ndarray) -> np.ndarray:
        """Token embeddings [1, S, hidden] with the image positions replaced by ``features`` [1, N, hidden]."""
        embeds = self.decoder.embed(np.asarray([ids], np.int64))
        at = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        if len(at) != features.shape[1]:
            raise InputError(f"{len(at)} image tokens in the prompt but {features.shape[1]} image features")
        embeds[0, at] = features[0]
        return embeds

    def forward_ids(self, ids: list[int], features: np.ndarray, past: Past) -> tuple[np.ndarray, Past]:
        """Logits [1, S, V] and present of ``ids`` (image tokens filled with ``features``) after ``past``."""
        return self.decoder.forward_embeds(self.embed(ids, features), past)
