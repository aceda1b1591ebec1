"""Pre-train the demo teacher: a tiny open_clip model trained contrastively on captioned shapes.

The analogue of web-scale CLIP pre-training for the built-in demo: captions such as "a sketch of
a right triangle." over every demo style plus styles the demo dataset never shows, so the teacher
generalises across styles the way CLIP does across domains, and over a vocabulary broader than the
demo's labels (every class's variants, and shapes the demo never shows), as CLIP's is. Images are
drawn with seeds disjoint from the demo dataset's. Reproduce the shipped checkpoint with

    python -m data.pretrain_teacher

which writes ``data/demo_teacher/open_clip_model.safetensors`` (float16) in about 16 minutes on 2 CPU cores.
"""
import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import demo

FOLDER = Path(__file__).parent / "demo_teacher"
STYLES = demo.DOMAINS + demo.EXTRA_STYLES
SHAPES = demo.CLASSES + demo.EXTRA_SHAPES
SEED = 1234


def caption(style: str, shape: str, variant: str | None, rng: np.random.Generator) -> tuple:
    """A caption and the (style, variant) it names; None where it names none, e.g. "a star." fits
    every style and variant of a star."""
    style = style if rng.random() < 0.7 else None
    variant = variant if variant is not None and rng.random() < 0.7 else None
    words = " ".join(word for word in (variant, shape) if word)
    return (f"a {style} of a {words}." if style else f"a {words}."), style, variant


def make_pool(per_pair: int, size: int, seed: int):
    """Images [N, 3, size, size] in [0, 1] and their (style, shape, variant name or None)."""
    images, pairs = [], []
    for s, style in enumerate(STYLES):
        for c, shape in enumerate(SHAPES):
            rng = np.random.default_rng([seed, s, c])
            variants = demo.VARIANTS.get(shape, (None,))
            for _ in range(per_pair):
                variant = int(rng.integers(len(variants)))
                image = demo.draw(shape, style, rng, size=int(rng.integers(64, 89)), variant=variant)
                images.append(np.asarray(image.resize((size, size)), np.float32) / 255.0)
                pairs.append((style, shape, variants[variant]))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), pairs


def augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Cheap augmentation close to the pipeline's views: one random resized crop (scale 0.6-1) and
    flip for the whole batch; per image a brightness factor, and for some images swapped colour
    channels (a hue change) or greyscale, so the teacher does not key on colour."""
    size = batch.shape[-1]
    side = int(size * np.sqrt(rng.uniform(0.6, 1.0)))
    y, x = rng.integers(0, size - side + 1, size=2)
    out = F.interpolate(batch[:, :, y:y + side, x:x + side], size=(size, size), mode="bilinear",
                        align_corners=False)
    out = out.flip(-1) if rng.random() < 0.5 else out
    n = len(out)
    swapped = torch.from_numpy(rng.random(n) < 0.5)
    out[swapped] = out[swapped][:, torch.from_numpy(rng.permutation(3))]
    grey = torch.from_numpy(rng.random(n) < 0.1)
    out[grey] = out[grey].mean(1, keepdim=True).expand(-1, 3, -1, -1)
    brightness = torch.from_numpy(rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32))
    return (out * brightness).clamp(0, 1)


def train(steps: int, batch_size: int, per_pair: int, lr: float, seed: int = SEED, folder: Path = FOLDER) -> Path:
    """Train from random weights; write ``folder/open_clip_model.safetensors`` (and the config)."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "open_clip_config.json").exists():
        shutil.copy(FOLDER / "open_clip_config.json", folder / "open_clip_config.json")
    name = f"local-dir:{folder}"
    for old in folder.glob("*.safetensors"):
        old.unlink()  # start from random weights, not from the previous checkpoint
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    cfg = model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    images, pairs = make_pool(per_pair, cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0], seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    started = time.time()
    model.train()
    for step in range(1, steps + 1):
        chosen = rng.choice(len(pairs), batch_size, replace=False)
        pixels = (augment(images[chosen], rng) - mean) / std
        captions = [caption(*pairs[i], rng) for i in chosen]
        tokens = tokenizer([text for text, _, _ in captions])
        image_features, text_features, logit_scale = model(pixels, tokens)[:3]
        logits = logit_scale * image_features @ text_features.T
        # captions repeat within a batch: image i and caption j match when the caption describes
        # the image (same shape, and the same style and variant where it names them)
        match = torch.tensor([[pairs[i][1] == pairs[j][1] and style in (None, pairs[i][0]) and variant in (None, pairs[i][2])
                               for (_, style, variant), j in zip(captions, chosen)] for i in chosen],
                             dtype=torch.float32)
        image_loss = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        text_loss = -(match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = (image_loss + text_loss) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    # The logit rule of a released CLIP: OpenAI's ends training at its clamp, 100 (this one learnt
    # about 22). Its embeddings are unchanged; float32, so the scale reads as 100, not fp16's 100.03.
    state["logit_scale"] = torch.tensor(math.log(100.0))
    path = folder / "open_clip_model.safetensors"
    save_file(state, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=192)
    parser.add_argument("--per-pair", type=int, default=160, help="images per (style, shape)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=SEED, help="weights, images and batches")
    parser.add_argument("--out", type=Path, default=FOLDER, help="the teacher's folder")
    args = parser.parse_args()
    print(f"wrote {train(args.steps, args.batch_size, args.per_pair, args.lr, args.seed, args.out)}")


if __name__ == "__main__":
    main()
