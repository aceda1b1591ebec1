"""Augmented views: sampled once with a seeded generator, recorded, and replayed exactly.

A view is described by a parameter vector (``PARAM_NAMES``) in the *source image's* pixels,
so it does not depend on any model's input size. ``render`` turns an image and a parameter
vector into the view's pixels; extraction feeds those pixels to the teacher, training feeds
the very same pixels to the student. Each model then applies only its own resize and
normalisation (``InputSpec``).

Sampling follows the official DomainBed/VL2V training transform: RandomResizedCrop with
scale (0.7, 1.0) and ratio (3/4, 4/3), horizontal flip p=0.5, ColorJitter(0.3, 0.3, 0.3, 0.3)
with a random order of its four operations, RandomGrayscale p=0.1. View 0 is the
deterministic evaluation view: the whole image, no flip, no colour change; each model's
``InputSpec`` squashes it to its square input, as the official ``Resize((224, 224))``.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from cache.fingerprint import stable_int

PARAM_NAMES = ("x", "y", "w", "h", "flip", "brightness", "contrast", "saturation", "hue",
               "order0", "order1", "order2", "order3", "grayscale")
N_PARAMS = len(PARAM_NAMES)


@dataclass(frozen=True)
class View:
    """One view's parameters by name; stored as the float32 vector ``PARAM_NAMES`` orders."""

    x: int                 # crop box in source pixels
    y: int
    w: int
    h: int
    flip: bool
    brightness: float      # colour-jitter factors ...
    contrast: float
    saturation: float
    hue: float
    order: tuple           # ... applied in this order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    grayscale: bool

    @classmethod
    def from_vector(cls, params: np.ndarray) -> "View":
        p = [float(v) for v in params]
        return cls(int(p[0]), int(p[1]), int(p[2]), int(p[3]), bool(p[4]), p[5], p[6], p[7], p[8],
                   tuple(int(v) for v in p[9:13]), bool(p[13]))

    def vector(self) -> np.ndarray:
        return np.array([self.x, self.y, self.w, self.h, self.flip, self.brightness, self.contrast,
                         self.saturation, self.hue, *self.order, self.grayscale], dtype=np.float32)

    @property
    def recolours(self) -> bool:
        return not (self.brightness == 1 and self.contrast == 1 and self.saturation == 1 and self.hue == 0)


@dataclass(frozen=True)
class Augment:
    """The training augmentation distribution (official defaults)."""

    scale: tuple = (0.7, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: float = 0.3
    grayscale_p: float = 0.1
    eval_view: str = "full-image"  # view 0; part of the cache identity (older caches: a centred square)

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "ratio": list(self.ratio), "flip_p": self.flip_p,
                "jitter": self.jitter, "grayscale_p": self.grayscale_p, "eval_view": self.eval_view}


def eval_view(width: int, height: int) -> np.ndarray:
    """The whole image, unchanged (the model's resize squashes it to a square, no crop)."""
    return View(0, 0, width, height, False, 1.0, 1.0, 1.0, 0.0, (0, 1, 2, 3), False).vector()


def sample_views(path: str, width: int, height: int, n_views: int, seed: int,
                 augment: Augment = Augment()) -> np.ndarray:
    """Parameters of ``n_views`` views of one image: [n_views, N_PARAMS] float32.

    The generator is seeded by (seed, path), so an image's views do not depend on the other
    images, and the first k views are the same whatever ``n_views`` is.
    """
    rng = np.random.default_rng([seed, stable_int(path)])
    views = [eval_view(width, height)]
    for _ in range(1, n_views):
        views.append(_sample_view(rng, width, height, augment))
    return np.stack(views)


def _sample_view(rng: np.random.Generator, width: int, height: int, aug: Augment) -> np.ndarray:
    x, y, w, h = _random_resized_crop(rng, width, height, aug.scale, aug.ratio)
    flip = float(rng.random() < aug.flip_p)
    j = aug.jitter
    order = rng.permutation(4)
    brightness, contrast, saturation = rng.uniform(1 - j, 1 + j, size=3)
    hue = rng.uniform(-j, j)
    gray = float(rng.random() < aug.grayscale_p)
    return View(x, y, w, h, flip, brightness, contrast, saturation, hue, tuple(order), gray).vector()


def _random_resized_crop(rng, width, height, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, drawn from a NumPy generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: central crop with the ratio clamped
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def render(image: Image.Image, params: np.ndarray) -> Image.Image:
    """The view's pixels, at source resolution: crop, flip, colour jitter, grayscale."""
    v = View.from_vector(params)
    view = image.crop((v.x, v.y, v.x + v.w, v.y + v.h))
    if v.flip:
        view = ImageOps.mirror(view)
    adjust = (
        lambda im: TF.adjust_brightness(im, v.brightness),
        lambda im: TF.adjust_contrast(im, v.contrast),
        lambda im: TF.adjust_saturation(im, v.saturation),
        lambda im: TF.adjust_hue(im, v.hue),
    )
    if v.recolours:
        for op in v.order:
            view = adjust[op](view)
    if v.grayscale:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    return view


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class InputSpec:
    """One model's own preprocessing of a view: resize to a square, scale, normalise."""

    size: int
    mean: tuple
    std: tuple
    interpolation: str = "bicubic"

    def resize(self, view: Image.Image) -> np.ndarray:
        """The view at this model's input size, [size, size, 3] uint8: what ``__call__`` normalises
        and what the student pixel cache (``data/pixels.py``) stores."""
        resample = _RESAMPLE.get(self.interpolation, Image.BICUBIC)
        return np.asarray(view.resize((self.size, self.size), resample), dtype=np.uint8)

    def __call__(self, view: Image.Image) -> torch.Tensor:
        pixels = self.resize(view).astype(np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}
