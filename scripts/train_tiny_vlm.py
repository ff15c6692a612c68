"""Train the tiny-vlm projector on CPU from offline procedural data; write the fp16 asset.

    python scripts/train_tiny_vlm.py [--seed 0] [--num-images 2048] [--lm-steps 24] [--batch 16]

Frozen MobileNetV2 (ImageNet) features and frozen SmolLM2-135M-Instruct; only the projector
(edgekv/host/tiny_vlm.py ``Projector``) learns. Data (edgekv/data/scenes.py), all generated here:
single-object scenes ("a red triangle on the left"), several same-looking objects ("three blue
squares"), mixed scenes ("a red circle on the top and a green star on the left"), sklearn digits
(train split: "the digit 7") and rendered words ("the word 'cat'"). Each image is paired with
the prompt "Describe the image." in the tiny-vlm chat template (the image first).

Two phases, both seeded (torch and numpy) and run with 2 threads:

1. warm start (cheap, no LM pass): every image token's logit-lens distribution (token @ E^T with
   the tied embedding table E) is pulled toward the caption's content words, with the token
   norm held near the embeddings' norm; this places the tokens near words like "red" and
   "triangle" so the LM reads them from the start;
2. LM loss: the caption tokens (+ ``<|im_end|>``) given image + prompt, gradients flowing through
   the frozen LM into the projector (logits computed at the caption positions only).

MobileNetV2 features are computed once per image. The shipped asset is two runs (stage 2 continues
stage 1 with the LM loss on fresh images; both logs are kept):

    python scripts/train_tiny_vlm.py --out out/stage1.safetensors
    python scripts/train_tiny_vlm.py --init out/stage1.safetensors --seed 1 --num-images 384 --warm-steps 0 \
        --log benchmarks/results/tiny_vlm_train_stage2.json
 Writes edgekv/host/assets/tiny_vlm_projector.safetensors
and benchmarks/results/tiny_vlm_train.json (time, settings, losses).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edgekv.data import scenes  # noqa: E402
from edgekv.host import tiny_vlm as tv  # noqa: E402
from edgekv.runtime.vision import ImageProcessorConfig, preprocess  # noqa: E402

WORDS = ("cat", "dog", "sun", "tree", "book", "fish", "car", "house", "bird", "moon", "star", "apple",
         "red", "blue", "green", "milk", "door", "hat", "cup", "ship")
# task -> share of the training images
MIX = {"single": 0.5, "count": 0.15, "mixed": 0.1, "digit": 0.15, "word": 0.1}


def make_example(rng: np.random.Generator, task: str, size: int) -> tuple[object, str]:
    """(PIL image, caption) of one training example."""
    if task == "single":
        scene = scenes.random_scene(rng, 1)
    elif task == "count":
        colours, shapes = tuple(scenes.COLOURS), scenes.SHAPES
        scene = scenes.count_scene(rng, int(rng.integers(2, 5)), shapes[int(rng.integers(len(shapes)))],
                                   colours[int(rng.integers(len(colours)))])
    elif task == "mixed":
        scene = scenes.random_scene(rng, 2)
    elif task == "digit":
        image, digit = scenes.digit_image(rng, size=size, split="train")
        return image, f"the digit {digit}"
    else:
        word = WORDS[int(rng.integers(len(WORDS)))]
        return scenes.text_image(word, rng, size=size), f"the word '{word}'"
    return scenes.render_scene(scene, size), scenes.caption(scene)


def make_dataset(seed: int, num: int, size: int) -> tuple[list[object], list[str], list[str]]:
    rng = np.random.default_rng(seed)
    tasks = list(MIX)
    probs = np.array([MIX[t] for t in tasks])
    chosen = [tasks[i] for i in rng.choice(len(tasks), size=num, p=probs / probs.sum())]
    images, captions = [], []
    for task in chosen:
        image, text = make_example(rng, task, size)
        images.append(image)
        captions.append(text)
    return images, captions, chosen


@torch.no_grad()
def grid_features(images: list[object], cfg: tv.TinyVLMConfig, batch: int = 64) -> torch.Tensor:
    """MobileNetV2 token grids [num, N, 1280] of preprocessed images (the runtime's preprocessing)."""
    proc = ImageProcessorConfig.from_hf(tv.preprocessor_dict(cfg))
    tower = tv.load_mobilenet_v2()
    out = []
    for i in tqdm(range(0, len(images), batch), desc="MobileNetV2 features", leave=False):
        pixels = np.concatenate([preprocess(im, proc).pixel_values for im in images[i:i + batch]])
        out.append(tv.grid_tokens(tower.features(torch.from_numpy(pixels))))
    return torch.cat(out)


def content_ids(tok, caption: str) -> list[int]:
    """Token ids of the caption's content words (no articles / prepositions)."""
    stop = {"a", "an", "the", "on", "in", "and", "word", "digit"}
    words = [w.strip("'") for w in caption.split() if w.strip("'") not in stop]
    return sorted({i for w in words for i in tok(" " + w, add_special_tokens=False).input_ids})


def warm_start(proj, feats, targets, table, steps, batch, lr, gen) -> list[float]:
    """Phase 1: per-token logit-lens cross-entropy to the content words + norm hold.

    ``table`` [V', hidden] is a subset of the embedding rows (all caption words + seeded random
    negatives) so that a step costs little; ``targets`` [num, V'] are rows summing to 1."""
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    norm = table.norm(dim=-1).mean()
    losses = []
    for _ in tqdm(range(steps), desc="warm start", leave=False):
        idx = torch.randint(len(feats), (batch,), generator=gen)
        out = proj(feats[idx])  # [b, N, hidden]
        logp = torch.log_softmax(out @ table.T, dim=-1)  # [b, N, V]
        tgt = targets[idx]  # [b, V] (rows sum to 1)
        ce = -(logp * tgt[:, None, :]).sum(-1).mean()
        loss = ce + ((out.norm(dim=-1) - norm) ** 2).mean() / norm ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def lm_batches(tok, captions: list[str], cfg: tv.TinyVLMConfig, image_id: int):
    """(prefix ids [P] with N image tokens, per-example answer ids incl. <|im_end|>)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": tv.PROMPT}]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace(tv.IMAGE_TOKEN, tv.IMAGE_TOKEN * cfg.num_image_tokens)
    prefix = tok(text, add_special_tokens=False).input_ids
    assert prefix.count(image_id) == cfg.num_image_tokens
    answers = [tok(c + "<|im_end|>", add_special_tokens=False).input_ids for c in captions]
    return prefix, answers


def lm_train(model, proj, feats, prefix, answers, steps, batch, lr, gen) -> list[float]:
    """Phase 2: LM loss on the answer tokens; the frozen LM passes gradients to the projector."""
    emb = model.get_input_embeddings()
    lm, head = model.model.language_model, model.lm_head
    pre = torch.tensor(prefix)
    at = (pre == model.config.image_token_index).nonzero().flatten()  # [N]
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * max(0.2, 1 - s / steps))
    losses = []
    order = torch.randperm(len(feats), generator=gen)
    for step in tqdm(range(steps), desc="LM loss", leave=False):
        idx = order[(torch.arange(batch) + step * batch) % len(feats)]
        ans = [answers[i] for i in idx.tolist()]
        length = max(len(a) for a in ans)
        ans_ids = torch.full((batch, length), 2, dtype=torch.long)
        ans_mask = torch.zeros(batch, length)
        for b, a in enumerate(ans):
            ans_ids[b, :len(a)] = torch.tensor(a)
            ans_mask[b, :len(a)] = 1
        with torch.no_grad():
            pre_emb = emb(pre)[None].repeat(batch, 1, 1)  # [b, P, hidden]
            ans_emb = emb(ans_ids)  # [b, L, hidden]
        img = proj(feats[idx])  # [b, N, hidden]
        pre_emb = pre_emb.index_copy(1, at, img)
        h = lm(inputs_embeds=torch.cat([pre_emb, ans_emb], 1), use_cache=False).last_hidden_state
        P = len(prefix)
        logits = head(h[:, P - 1:P - 1 + length])  # [b, L, V]: position t predicts answer token t
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ans_ids.flatten(), reduction="none")
        loss = (nll * ans_mask.flatten()).sum() / ans_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, default=2048)
    ap.add_argument("--warm-steps", type=int, default=300)
    ap.add_argument("--negatives", type=int, default=4096, help="random vocabulary rows in the warm start")
    ap.add_argument("--lm-steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", default=None, help="start from this projector (a second stage; see below)")
    ap.add_argument("--out", default=tv.ASSET)
    ap.add_argument("--log", default=os.path.join(ROOT, "benchmarks", "results", "tiny_vlm_train.json"))
    args = ap.parse_args()

    from edgekv.host.models import _builtin_folder

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    cfg = tv.TinyVLMConfig()
    images, captions, tasks = make_dataset(args.seed, args.num_images, cfg.image_size)
    feats = grid_features(images, cfg)
    t_feats = time.perf_counter() - t0

    llama, tok = tv.load_language_model(_builtin_folder("smollm2-135m"))
    tok = tv.make_tokenizer(tok)
    torch.manual_seed(args.seed)
    proj = tv.load_projector(cfg, args.init) if args.init else tv.Projector(cfg)
    model = tv.assemble(llama, tok, proj, cfg)
    for p in proj.parameters():
        p.requires_grad_(True)
    proj.train()
    full = model.get_input_embeddings().weight.detach()[:-1]  # [V, hidden] without <image>
    words = [content_ids(tok, c) for c in captions]
    vocab = sorted({i for ids in words for i in ids})
    negatives = torch.randperm(full.shape[0], generator=gen)[:args.negatives].tolist()
    rows = vocab + sorted(set(negatives) - set(vocab))  # caption words first
    table = full[rows]  # [V', hidden]
    targets = torch.zeros(len(captions), len(rows))
    for i, ids in enumerate(words):
        targets[i, [vocab.index(j) for j in ids]] = 1.0 / len(ids)
    t1 = time.perf_counter()
    warm = warm_start(proj, feats, targets, table, args.warm_steps, 64, args.lr, gen)
    t_warm = time.perf_counter() - t1
    prefix, answers = lm_batches(tok, captions, cfg, model.config.image_token_index)
    t2 = time.perf_counter()
    lm_losses = lm_train(model, proj, feats, prefix, answers, args.lm_steps, args.batch, args.lr, gen)
    t_lm = time.perf_counter() - t2
    proj.eval()
    tv.save_projector(proj, args.out)

    def smooth(xs: list[float], k: int = 8) -> list[float]:
        return [round(float(np.mean(xs[i:i + k])), 4) for i in range(0, len(xs), k)]

    print("warm loss", smooth(warm, 50), file=sys.stderr)

    log = {"seed": args.seed, "init": args.init and os.path.relpath(args.init, ROOT), "num_images": args.num_images, "task_counts": {t: tasks.count(t) for t in MIX},
           "warm_steps": args.warm_steps, "negatives": args.negatives, "lm_steps": args.lm_steps,
           "batch": args.batch, "lr": args.lr,
           "threads": torch.get_num_threads(), "num_image_tokens": cfg.num_image_tokens,
           "seconds": {"data_and_features": round(t_feats, 1), "warm_start": round(t_warm, 1),
                       "lm_loss": round(t_lm, 1), "total": round(time.perf_counter() - t0, 1)},
           "warm_loss_first_last": [round(warm[0], 4), round(warm[-1], 4)] if warm else [],
           "warm_loss_every_50_steps": smooth(warm, 50), "lm_loss_every_4_steps": smooth(lm_losses, 4), "asset": os.path.relpath(args.out, ROOT),
           "asset_bytes": os.path.getsize(args.out)}
    os.makedirs(os.path.dirname(args.log), exist_ok=True)
    with open(args.log, "w", encoding="utf-8") as f:
        json.dump(log, f, indent=2)
    print(json.dumps(log["seconds"]), "lm loss", log["lm_loss_every_4_steps"])


if __name__ == "__main__":
    main()
