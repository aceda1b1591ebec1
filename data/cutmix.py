"""CutMix on a batch of student inputs, as the official code (Yun et al., 2019).

Cached teacher targets cannot see the pasted patch, so the losses mix the two images'
targets by area instead (see ``stages/losses.py``).
"""
import numpy as np
import torch


def rand_bbox(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple:
    """A box covering about ``1 - lam`` of the image, centred uniformly, clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.integers(height), rng.integers(width)
    y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(y1), int(y2), int(x1), int(x2)


def cutmix(images: torch.Tensor, rng: np.random.Generator, beta: float = 1.0):
    """Paste a box from a shuffled copy of the batch into each image.

    Returns ``(mixed_images, permutation, mix)``: image i now shows image ``permutation[i]``
    inside the box, and ``mix`` is the fraction of each image left unchanged.
    """
    lam = rng.beta(beta, beta)
    permutation = torch.from_numpy(rng.permutation(images.shape[0]))
    y1, y2, x1, x2 = rand_bbox(images.shape[-2], images.shape[-1], lam, rng)
    mixed = images.clone()
    mixed[:, :, y1:y2, x1:x2] = images[permutation, :, y1:y2, x1:x2]
    mix = 1.0 - (y2 - y1) * (x2 - x1) / (images.shape[-2] * images.shape[-1])
    return mixed, permutation, float(mix)
