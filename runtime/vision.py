"""Image preprocessing on the device: numpy + Pillow, equal to Hugging Face's image processors.

Two processors are reproduced (the slow, PIL-based ones; ``tests/test_vision_preprocess.py``
holds them equal):

* ``clip`` — ``CLIPImageProcessor`` (LLaVA): RGB; resize the shortest edge to
  ``shortest_edge`` (bicubic, long edge ``int(size * long / short)``); centre crop
  ``crop_size`` (``top = (H - h) // 2``, zero padding when the image is smaller); rescale
  by 1/255 (in float64, then float32); normalise ``(x - mean) / std``. -> [1, 3, h, w]
* ``idefics3`` — ``Idefics3ImageProcessor`` (Idefics3 / SmolVLM): resize the longest edge
  to ``longest_edge`` (even short edge, Lanczos); with ``do_image_splitting``, resize up to
  multiples of ``max_image_size`` and cut into ``rows x cols`` tiles followed by the whole
  image squared to ``max_image_size``; without, square the image to ``max_image_size``.
  -> [N, 3, s, s] with the tile grid (rows, cols; 0, 0 without splitting).

All resizes run on uint8 images through Pillow, as Hugging Face does, so outputs agree to
float32 rounding. The parameters come from the processor's own ``to_dict()``, stored in
``manifest.json`` under ``vision.processor`` at export.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from edgekv.configs import Config
from edgekv.errors import InputError, MissingDependencyError

KINDS = ("clip", "idefics3")
MAX_IMAGE_SIDE = 4096  # Idefics3's MAX_IMAGE_SIZE: resized images never exceed it
MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs before decoding

PILLOW_INSTALL = "pip install 'edgekv[vision]'"  # the extra that brings Pillow

# PIL resample codes (PIL.Image.Resampling values; Hugging Face stores the int).
BICUBIC, LANCZOS = 3, 1


@dataclass(frozen=True)
class ImageProcessorConfig(Config):
    """What a Hugging Face image processor does, as plain fields (JSON round-trip)."""

    kind: str  # "clip" | "idefics3"
    resample: int  # PIL resample code
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    shortest_edge: int = 0  # clip: resize target of the short edge
    crop_size: tuple[int, int] = (0, 0)  # clip: (height, width) of the centre crop; (0, 0) = no crop
    longest_edge: int = 0  # idefics3: resize target of the long edge
    max_image_size: int = 0  # idefics3: tile side (the vision encoder's input)
    do_image_splitting: bool = False  # idefics3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"ImageProcessorConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise InputError("ImageProcessorConfig.image_mean and image_std must hold 3 values (std > 0)")
        if self.kind == "clip" and self.do_resize and self.shortest_edge < 1:
            raise InputError("ImageProcessorConfig.shortest_edge must be >= 1 for a clip processor")
        if self.kind == "idefics3" and (self.max_image_size < 1 or (self.do_resize and self.longest_edge < 1)):
            raise InputError("ImageProcessorConfig.max_image_size and longest_edge must be >= 1 for an idefics3 "
                             "processor")

    @staticmethod
    def from_hf(d: dict) -> ImageProcessorConfig:
        """From a Hugging Face image processor's ``to_dict()``."""
        name = d.get("image_processor_type", "")

        def three(v) -> tuple[float, ...]:  # a scalar mean/std means the same for each channel
            return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))

        common = dict(resample=int(d.get("resample", BICUBIC)), image_mean=three(d["image_mean"]),
                      image_std=three(d["image_std"]), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                      do_resize=bool(d.get("do_resize", True)), do_rescale=bool(d.get("do_rescale", True)),
                      do_normalize=bool(d.get("do_normalize", True)))
        if name.startswith("CLIPImageProcessor"):
            size, crop = d["size"], d.get("crop_size") or {}
            edge = size["shortest_edge"] if isinstance(size, dict) else int(size)
            crop_hw = (int(crop["height"]), int(crop["width"])) if d.get("do_center_crop", True) and crop else (0, 0)
            return ImageProcessorConfig("clip", shortest_edge=int(edge), crop_size=crop_hw, **common)
        if name.startswith("Idefics3ImageProcessor"):
            return ImageProcessorConfig("idefics3", longest_edge=int(d["size"]["longest_edge"]),
                                        max_image_size=int(d["max_image_size"]["longest_edge"]),
                                        do_image_splitting=bool(d.get("do_image_splitting", True)), **common)
        raise InputError(f"image processor {name!r} is not supported (supported: CLIPImageProcessor, "
                         f"Idefics3ImageProcessor)")

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        """From manifest.json's ``vision.processor`` (:meth:`to_dict`)."""
        try:
            return super().from_dict(d)
        except (InputError, TypeError) as e:
            raise InputError(f"image processor settings in manifest.json are invalid ({e})") from None


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray  # [N, 3, h, w] float32 (N = 1, or tiles + the global image)
    rows: int = 0  # idefics3 tile grid (0, 0: no splitting)
    cols: int = 0


# --- loading -------------------------------------------------------------------------
def pillow(what: str = "an image"):
    """The ``PIL.Image`` module, imported on first use (text-only use never needs Pillow); without
    Pillow, :class:`MissingDependencyError`: ``what`` needs it, and the extra to install."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(f"{what} needs Pillow: {PILLOW_INSTALL}") from None
    return Image


def load_image(image) -> object:
    """A PIL image from a path or a PIL image; unreadable input -> InputError (one line)."""
    Image = pillow()
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise InputError(f"image must be a file path or a PIL image, got {type(image).__name__}")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise InputError(f"image {path} not found")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (Image.UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image {path} cannot be read ({str(e).splitlines()[0][:160]})") from None


def _to_uint8(image, keep_alpha: bool) -> np.ndarray:
    """[H, W, 3] uint8 RGB (Pillow's convert, as CLIP's convert_to_rgb), or [H, W, 4] RGBA when
    ``keep_alpha`` and the image has transparency (Idefics3 resizes RGBA and composites later)."""
    if keep_alpha and (image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info)):
        return np.asarray(image.convert("RGBA"), dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _composite_on_white(img: np.ndarray) -> np.ndarray:
    """[H, W, 4] RGBA -> [H, W, 3] RGB on a white background (Idefics3's convert_to_rgb)."""
    if img.shape[2] == 3:
        return img
    Image = pillow()
    white = Image.new("RGBA", (img.shape[1], img.shape[0]), (255, 255, 255))
    return np.asarray(Image.alpha_composite(white, Image.fromarray(img, "RGBA")).convert("RGB"), dtype=np.uint8)


# --- pure numpy / Pillow steps -------------------------------------------------------
def resize(img: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """[H, W, C] uint8 (C = 3 or 4) -> [height, width, C] uint8 via Pillow (as Hugging Face's resize)."""
    Image = pillow()
    return np.asarray(Image.fromarray(img).resize((width, height), resample=resample), dtype=np.uint8)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """CLIP: the short edge becomes ``size``, the long one ``int(size * long / short)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C]; zero-padded (centred) where the image is smaller."""
    H, W = img.shape[:2]
    top, left = (H - height) // 2, (W - width) // 2
    if top >= 0 and left >= 0 and top + height <= H and left + width <= W:
        return img[top:top + height, left:left + width]
    nh, nw = max(height, H), max(width, W)
    out = np.zeros((nh, nw, img.shape[2]), img.dtype)
    tp, lp = math.ceil((nh - H) / 2), math.ceil((nw - W) / 2)
    out[tp:tp + H, lp:lp + W] = img
    top, left = top + tp, left + lp
    return out[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def rescale_normalize(img: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, H, W] float32: x * factor (float64, then float32), (x - mean) / std."""
    x = img.astype(np.float64) * cfg.rescale_factor if cfg.do_rescale else img.astype(np.float64)
    x = x.astype(np.float32)
    if cfg.do_normalize:
        x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), np.float32)


def longest_edge_size(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Idefics3: the long edge becomes ``max_len``, the short one keeps the aspect ratio (even),
    then both are bounded by MAX_IMAGE_SIDE."""
    aspect = width / height
    if width >= height:
        width, height = max_len, int(max_len / aspect)
        height += height % 2
    else:
        height, width = max_len, int(max_len * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif height > width and height > MAX_IMAGE_SIDE:
        height, width = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Idefics3 ``resize_for_vision_encoder``: both edges up to multiples of ``tile``."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def split_tiles(img: np.ndarray, tile: int, resample: int) -> tuple[list[np.ndarray], int, int]:
    """Idefics3 ``split_image``: row-major tiles, then the whole image squared to ``tile``."""
    H, W = img.shape[:2]
    if H <= tile and W <= tile:
        return [img], 0, 0
    rows, cols = math.ceil(H / tile), math.ceil(W / tile)
    th, tw = math.ceil(H / rows), math.ceil(W / cols)
    tiles = [img[r * th:min((r + 1) * th, H), c * tw:min((c + 1) * tw, W)] for r in range(rows) for c in range(cols)]
    whole = img if (H, W) == (tile, tile) else resize(img, tile, tile, resample)
    return [*tiles, whole], rows, cols


# --- the processors -------------------------------------------------------------------
def preprocess(image, cfg: ImageProcessorConfig) -> ProcessedImage:
    """A path or PIL image -> pixel values as the Hugging Face processor of ``cfg.kind`` gives."""
    img = _to_uint8(load_image(image), keep_alpha=cfg.kind == "idefics3")  # [H, W, 3 or 4] uint8
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise InputError("the image is empty (0 pixels)")
    if cfg.kind == "clip":
        if cfg.do_resize:
            img = resize(img, *shortest_edge_size(img.shape[0], img.shape[1], cfg.shortest_edge), cfg.resample)
        if cfg.crop_size != (0, 0):
            img = center_crop(img, *cfg.crop_size)
        return ProcessedImage(rescale_normalize(img, cfg)[None])
    if cfg.do_resize:
        img = resize(img, *longest_edge_size(img.shape[0], img.shape[1], cfg.longest_edge), cfg.resample)
    s = cfg.max_image_size
    if cfg.do_image_splitting:
        img = resize(img, *tile_multiple_size(img.shape[0], img.shape[1], s), cfg.resample)
        frames, rows, cols = split_tiles(img, s, cfg.resample)
    else:
        frames, rows, cols = [resize(img, s, s, cfg.resample)], 0, 0
    # tiles are all s x s here (sizes are multiples of s), so Hugging Face's padding is a no-op
    frames = [_composite_on_white(f) for f in frames]
    return ProcessedImage(np.stack([rescale_normalize(f, cfg) for f in frames]), rows, cols)
