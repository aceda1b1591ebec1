"""The built-in demo dataset: simple shapes drawn in visually distinct styles (domains).

Generated from a seed in a few seconds, no download. Layout is DomainBed's, so the demo goes
through exactly the same code as a real dataset.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "square", "star", "triangle")
DOMAINS = ("cartoon", "photo", "pixel", "sketch")
# Styles only the demo teacher's pre-training sees, like the breadth of web images.
EXTRA_STYLES = ("painting", "neon")


def shape_points(name: str, cx: float, cy: float, r: float, angle: float) -> list:
    """Polygon of a shape centred at (cx, cy) with radius r, rotated by angle (radians)."""
    if name == "circle":
        corners = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif name == "square":
        corners = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif name == "triangle":
        corners = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif name == "star":
        corners = [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                    (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
                   for i in range(10)]
    elif name == "cross":
        a, b = 0.3, 0.9
        corners = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                   (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"unknown shape {name}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in corners]


def draw(shape: str, domain: str, rng: np.random.Generator, size: int = 72) -> Image.Image:
    """One image of ``shape`` in the style of ``domain``."""
    cx, cy = rng.uniform(0.38, 0.62, size=2) * size
    r = rng.uniform(0.22, 0.34) * size
    points = shape_points(shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
    colour = tuple(int(c) for c in rng.integers(30, 226, size=3))
    if domain == "photo":  # smooth gradient background, shaded shape, sensor noise
        top, bottom = rng.integers(60, 200, size=(2, 3))
        ramp = np.linspace(0, 1, size)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1)
        image = Image.fromarray(background.astype(np.uint8), "RGB")
        ImageDraw.Draw(image).polygon(points, fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(1.0))
        pixels = np.asarray(image, np.float32) + rng.normal(0, 8, size=(size, size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if domain == "sketch":  # pencil outline on paper, slightly jittered strokes
        image = Image.new("RGB", (size, size), (245, 245, 240))
        pen = ImageDraw.Draw(image)
        for _ in range(2):
            wobble = [(x + rng.normal(0, 0.8), y + rng.normal(0, 0.8)) for x, y in points]
            pen.line(wobble + wobble[:1], fill=(40, 40, 40), width=1)
        return image
    if domain == "cartoon":  # flat saturated fill, thick black outline, plain background
        background = tuple(int(c) for c in rng.integers(200, 256, size=3))
        image = Image.new("RGB", (size, size), background)
        pen = ImageDraw.Draw(image)
        pen.polygon(points, fill=colour)
        pen.line(points + points[:1], fill=(0, 0, 0), width=3)
        return image
    if domain == "pixel":  # low-resolution blocky rendering, two-colour palette
        small = max(size // 5, 8)
        scale = small / size
        image = Image.new("RGB", (small, small), tuple(int(c) for c in rng.integers(0, 80, size=3)))
        ImageDraw.Draw(image).polygon([(x * scale, y * scale) for x, y in points], fill=colour)
        return image.resize((size, size), Image.NEAREST)
    if domain == "painting":  # soft brushy colour fields, no outline
        background = tuple(int(c) for c in rng.integers(90, 230, size=3))
        image = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(image).polygon(points, fill=colour)
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(2.0)), np.float32)
        strokes = rng.normal(0, 9, size=(size // 4 + 1, size // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:size, :size]
        return Image.fromarray(np.clip(pixels + strokes, 0, 255).astype(np.uint8), "RGB")
    if domain == "neon":  # glowing coloured outline on black
        image = Image.new("RGB", (size, size), (0, 0, 0))
        glow = tuple(int(c) for c in rng.integers(120, 256, size=3))
        ImageDraw.Draw(image).line(points + points[:1], fill=glow, width=3)
        halo = image.filter(ImageFilter.GaussianBlur(2))
        return Image.fromarray(np.maximum(np.asarray(image), np.asarray(halo)), "RGB")
    raise ValueError(f"unknown domain {domain}")


def generate(root, per_class: int = 30, seed: int = 0, domains=DOMAINS, classes=CLASSES) -> Path:
    """Write ``root/<domain>/<class>/<i>.png`` for every domain and class; returns root.

    Image sizes vary a little (64 to 88 pixels, not always square) so crops are exercised
    in source pixels. Existing files are left alone, so generating twice is a no-op.
    """
    root = Path(root)
    for d, domain in enumerate(domains):
        for c, shape in enumerate(classes):
            folder = root / domain / shape
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, d, c])
            for i in range(per_class):
                image = draw(shape, domain, rng, size=int(rng.integers(64, 89)))
                if rng.random() < 0.3:  # some non-square images
                    image = image.resize((image.width, int(image.height * rng.uniform(0.8, 1.0))))
                path = folder / f"{i:03d}.png"
                if not path.exists():
                    image.save(path)
    return root
