"""numpy + Pillow image preprocessing (edgekv.runtime.vision) equals Hugging Face's processors."""

from __future__ import annotations

import numpy as np
import pytest

from edgekv.errors import InputError
from edgekv.runtime.vision import ImageProcessorConfig, preprocess

# (height, width) of test images: landscape, portrait, square, tiny, odd sizes
SIZES = [(37, 53), (61, 29), (40, 40), (5, 9), (120, 77)]


def _image(h: int, w: int, seed: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth gradients + noise, so resampling filters matter
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        img = Image.fromarray(np.concatenate([arr, alpha], axis=-1), "RGBA")
    elif mode == "L":
        img = img.convert("L")
    return img


def _clip_processors():
    from transformers import CLIPImageProcessor

    return [CLIPImageProcessor(),  # LLaVA-1.5 / CLIP defaults: 224, bicubic, OpenAI mean/std
            CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
            CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 28})]


def _idefics3_processors():
    from transformers import Idefics3ImageProcessor

    small = dict(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    return [Idefics3ImageProcessor(**small, do_image_splitting=False),
            Idefics3ImageProcessor(**small, do_image_splitting=True),
            Idefics3ImageProcessor(size={"longest_edge": 4 * 364}, do_image_splitting=True)]  # SmolVLM defaults


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_clip_preprocess_equals_hugging_face(mode):
    for p, proc in enumerate(_clip_processors()):
        cfg = ImageProcessorConfig.from_hf(proc.to_dict())
        for i, (h, w) in enumerate(SIZES):
            img = _image(h, w, seed=10 * p + i, mode=mode)
            want = proc(images=img, return_tensors="np")["pixel_values"]
            got = preprocess(img, cfg).pixel_values
            assert got.shape == want.shape and got.dtype == np.float32
            assert np.abs(got - want).max() <= 1e-6, (p, h, w)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_idefics3_preprocess_equals_hugging_face(mode):
    """Grayscale input is left out: Hugging Face turns a 1-channel array into a palette image."""
    for p, proc in enumerate(_idefics3_processors()):
        cfg = ImageProcessorConfig.from_hf(proc.to_dict())
        for i, (h, w) in enumerate(SIZES):
            img = _image(h, w, seed=10 * p + i, mode=mode)
            want = proc(images=[img], return_tensors="np", return_row_col_info=True)
            got = preprocess(img, cfg)
            assert got.pixel_values.shape == want["pixel_values"][0].shape, (p, h, w)
            assert np.abs(got.pixel_values - want["pixel_values"][0]).max() <= 1e-6, (p, h, w)
            assert (got.rows, got.cols) == (want["rows"][0][0], want["cols"][0][0])
            assert want["pixel_attention_mask"][0].all()  # one image: no padding to undo


def test_splitting_makes_a_tile_grid_plus_the_global_image():
    from transformers import Idefics3ImageProcessor

    proc = Idefics3ImageProcessor(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    got = preprocess(_image(40, 90, seed=0), ImageProcessorConfig.from_hf(proc.to_dict()))
    # 90 wide -> longest edge 96 -> 96 x 44 -> multiples of 32: 96 x 64 -> 2 rows x 3 cols + global
    assert (got.rows, got.cols) == (2, 3) and got.pixel_values.shape == (7, 3, 32, 32)


def test_config_round_trips_through_json():
    import json

    for proc in _clip_processors() + _idefics3_processors():
        cfg = ImageProcessorConfig.from_hf(proc.to_dict())
        assert ImageProcessorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_unreadable_or_missing_image_is_an_input_error(tmp_path):
    from transformers import CLIPImageProcessor

    cfg = ImageProcessorConfig.from_hf(CLIPImageProcessor().to_dict())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match=r"bad.png cannot be read"):
        preprocess(str(bad), cfg)
    with pytest.raises(InputError, match=r"missing.png not found"):
        preprocess(str(tmp_path / "missing.png"), cfg)
    with pytest.raises(InputError, match="not supported"):
        ImageProcessorConfig.from_hf({"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5],
                                      "image_std": [0.5]})
