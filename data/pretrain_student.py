"""Pre-train the demo student: timm's ``test_resnet`` classifying photo-style shapes.

The analogue of an ImageNet-pretrained student for the built-in demo: supervised training on
**photos only**, over a vocabulary broader than the demo's five classes (``demo.CLASSES`` plus
``demo.EXTRA_SHAPES``), with random background tints, plain backgrounds (it never sees the demo's
background patterns, as ImageNet never saw a benchmark's particular cue) and the pipeline's own
training augmentation at the demo's student resolution. Images are drawn with seeds disjoint
from the demo dataset's. Reproduce the shipped weights with

    python -m data.pretrain_student

which writes ``data/demo_student/test_resnet_photo_shapes.safetensors`` (the backbone, without
its classifier, float32), loadable as ``--student-weights FILE`` like any local checkpoint.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import demo
from data.views import InputSpec, render, sample_views

FOLDER = Path(__file__).parent / "demo_student"
FILE = FOLDER / "test_resnet_photo_shapes.safetensors"
MODEL, SIZE, STYLE = "test_resnet", 32, "photo"
CLASSES = demo.CLASSES + demo.EXTRA_SHAPES
SEED = 4321


def make_pool(per_class: int, views: int, seed: int, spec) -> tuple:
    """``views`` augmented views of ``per_class`` photos of every class: pixels [N, 3, S, S], labels [N]."""
    pixels, labels = [], []
    for c, shape in enumerate(CLASSES):
        rng = np.random.default_rng([seed, c])
        for i in range(per_class):
            image = demo.draw(shape, STYLE, rng, size=int(rng.integers(64, 89)), pattern=0)
            for params in sample_views(f"{shape}/{i}", image.width, image.height, views, seed):
                pixels.append(spec(render(image, params)))
                labels.append(c)
    return torch.stack(pixels), torch.tensor(labels)


def train(steps: int, batch_size: int, per_class: int, lr: float, views: int = 4, seed: int = SEED,
          path: Path = FILE) -> Path:
    """Train ``test_resnet`` from random weights; write its backbone weights to ``path``."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=len(CLASSES))
    config = timm.data.resolve_data_config({}, model=model)  # the spec the pipeline will give it
    spec = InputSpec(size=SIZE, mean=tuple(config["mean"]), std=tuple(config["std"]),
                     interpolation=config.get("interpolation", "bicubic"))
    started = time.time()
    images, labels = make_pool(per_class, views, seed, spec)
    held = torch.arange(len(labels)) % (5 * views) < views  # every fifth image (all its views): validation
    train_x, train_y, val_x, val_y = images[~held], labels[~held], images[held], labels[held]
    print(f"{len(train_y)} training views, {len(val_y)} validation views of {len(CLASSES)} classes "
          f"({time.time() - started:.0f} s)", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        model.train()
        chosen = torch.randint(len(train_y), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(train_x[chosen]), train_y[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                accuracy = (model(val_x).argmax(1) == val_y).float().mean().item()
            print(f"step {step}/{steps} loss {loss.item():.3f} photo val acc {100 * accuracy:.1f}% "
                  f"({time.time() - started:.0f} s)", flush=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    classifier = model.pretrained_cfg.get("classifier", "fc")
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not k.startswith(classifier + ".")}
    save_file(state, path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--per-class", type=int, default=200, help="photos per class")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    print(f"wrote {train(args.steps, args.batch_size, args.per_class, args.lr)}")


if __name__ == "__main__":
    main()
