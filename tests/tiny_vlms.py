"""Tiny random vision-language models of real Hugging Face classes (LLaVA, Idefics3), offline.

Like ``tiny_models.py``: configs written here, seeded random weights, the in-process BPE
tokenizer with an ``<image>`` special token added, and the family's image processor
saved next to the model, so the folder loads like a user's model folder.
"""

from __future__ import annotations

import os

import numpy as np

IMAGE_TOKEN = "<image>"

# ChatML that also takes Hugging Face's list content ({"type": "image"} / {"type": "text"}),
# the way llava-hf templates place the image token.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VLM_FAMILIES = ("llava", "idefics3")
# Idefics3 / SmolVLM prompt tokens: tiles are announced by <row_r_col_c>, wrapped in <fake_token_around_image>
IDEFICS3_TOKENS = ["<fake_token_around_image>", "<global-img>"] + \
    [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]


def vlm_tokenizer(extra: tuple[str, ...] = ()):
    from tiny_models import train_tokenizer

    return train_tokenizer(added_special=(IMAGE_TOKEN, *extra), chat_template=VLM_CHAT_TEMPLATE)


def tiny_llava(tok):
    """LlavaForConditionalGeneration config: CLIP ViT 30x30 px, 6 px patches (25 image tokens)
    + a 3-layer Llama (GQA 4/2 heads, head dim 16); and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, rope_theta=10000.0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=30, patch_size=6, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=25)
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = 2, 1, 3
    proc = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return cfg, proc


def tiny_idefics3(tok):
    """Idefics3ForConditionalGeneration config: SigLIP-style ViT on 32x32 tiles, 8 px patches,
    pixel shuffle 2 (4 image tokens per tile) + the 3-layer Llama; its Idefics3ImageProcessor
    (longest edge 64, 32 px tiles: up to 2x2 tiles + the global image)."""
    from transformers import (
        Idefics3Config,
        Idefics3ImageProcessor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False, rope_theta=10000.0)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
    cfg = Idefics3Config(vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), tie_word_embeddings=False)
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = 2, 1, 3
    proc = Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return cfg, proc


def make_tiny_vlm(family: str, out_dir: str, seed: int = 0) -> str:
    """Save a tiny random ``family`` VLM (model, tokenizer, image processor) to ``out_dir``."""
    import torch
    from tiny_models import save_random_model
    from transformers import Idefics3ForConditionalGeneration, LlavaForConditionalGeneration

    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; choose from {VLM_FAMILIES}")
    tok = vlm_tokenizer(tuple(IDEFICS3_TOKENS) if family == "idefics3" else ())
    cfg, proc = (tiny_llava if family == "llava" else tiny_idefics3)(tok)
    torch.manual_seed(seed)
    model = (LlavaForConditionalGeneration if family == "llava" else Idefics3ForConditionalGeneration)(cfg)
    save_random_model(model, tok, out_dir)
    proc.save_pretrained(out_dir)
    return out_dir


def card(seed: int, size: tuple[int, int] = (41, 57)):
    """A random RGB picture (gradient + noise + a coloured square), not square-shaped."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, rng.integers(0, 256, (h, w))], axis=-1).astype(np.float64)
    arr += rng.normal(0, 30, arr.shape)
    arr[h // 4:h // 2, w // 3:w // 2] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_tiny_vlm_folder(llama_dir: str, out_dir: str) -> str:
    """A tiny-vlm model folder (real MobileNetV2, seeded random projector) around a tiny Llama."""
    import torch

    from edgekv.host.tiny_vlm import Projector, TinyVLMConfig, save_folder, save_projector

    os.makedirs(out_dir, exist_ok=True)
    cfg = TinyVLMConfig(hidden_size=64, projector_dim=32)
    torch.manual_seed(0)
    proj = Projector(cfg)
    with torch.no_grad():
        proj.pos.normal_(0, 0.5)
    path = os.path.join(out_dir, "proj.safetensors")
    save_projector(proj, path)
    return save_folder(llama_dir, os.path.join(out_dir, "model"), cfg, path)
