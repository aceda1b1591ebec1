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
# Shapes the demo dataset never shows: the demo student's pre-training classes (as photos only, its
# "ImageNet") and part of the teacher's vocabulary.
EXTRA_SHAPES = ("arrow", "diamond", "heart", "hexagon", "moon", "pentagon", "ring", "semicircle")
# Each class comes in variants that the labels do not name and the teacher's captions do, as a real
# class covers shapes that CLIP has other words for; they make the classes harder to tell apart
# across styles. Variant 0 is the plain class shape.
VARIANTS = {"circle": ("round", "oval"), "cross": ("thick", "thin"), "square": ("regular", "long"),
            "star": ("five-pointed", "four-pointed", "six-pointed"), "triangle": ("regular", "right")}
# Background tints are drawn at random. Background patterns are drawn at random in the teacher's
# pre-training; the demo dataset has plain backgrounds, or with ``generate(shortcut=f)`` a pattern
# that goes with the class in a fraction f of the images (a source-only shortcut, see
# ``pattern_of``; the README measures that world too). Patterns are luminance marks, so they survive
# the training views' colour jitter, greyscale, flips and crops, as a real shortcut (a background,
# a watermark) does.
TINTS = ((230, 60, 60), (60, 200, 60), (70, 90, 235), (235, 205, 40), (200, 70, 220))
PATTERNS = ("plain", "rows", "columns", "checks", "dots")
PATTERN_CONTRAST = 0.35  # how far the marks move toward black (light images) or white (dark ones)


def pattern_of(class_index: int, domain_index: int) -> int:
    """The pattern class ``class_index`` usually has in style ``domain_index``: a cyclic shift per
    style, so in a held-out style every class wears a pattern that meant another class in every
    source style."""
    return (class_index + domain_index) % len(PATTERNS)


def pattern_mask(pattern: int, width: int, height: int, period: int) -> np.ndarray:
    """The pixels that ``PATTERNS[pattern]`` marks: [height, width] bool."""
    y, x = np.mgrid[0:height, 0:width]
    row, column = y // period, x // period
    name = PATTERNS[pattern]
    if name == "rows":
        return row % 2 == 1
    if name == "columns":
        return column % 2 == 1
    if name == "checks":
        return (row + column) % 2 == 1
    if name == "dots":
        return (y % period < period // 2) & (x % period < period // 2)
    return np.zeros((height, width), bool)


def with_pattern(image: Image.Image, points: list, pattern: int, rng: np.random.Generator) -> Image.Image:
    """``image`` with ``PATTERNS[pattern]`` on its background (outside the shape ``points``): the
    marks move a third of the way to black on a light image, to white on a dark one."""
    if PATTERNS[pattern] == "plain":
        return image
    shape = Image.new("L", image.size, 0)
    ImageDraw.Draw(shape).polygon(points, fill=255)
    pixels = np.asarray(image, np.float32)  # a new float array, so writable
    marks = pattern_mask(pattern, image.width, image.height, int(rng.integers(6, 9)))
    marks &= np.asarray(shape) == 0
    target = 0.0 if pixels.mean() > 110 else 255.0
    pixels[marks] += PATTERN_CONTRAST * (target - pixels[marks])
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def shape_points(name: str, cx: float, cy: float, r: float, angle: float, variant: int = 0) -> list:
    """Polygon of a shape (``VARIANTS[name][variant]``) centred at (cx, cy) with radius r, rotated
    by angle (radians)."""
    if name == "circle":
        squash = (1.0, 0.55)[variant]
        corners = [(math.cos(t), squash * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    elif name == "square":
        w, h = ((0.75, 0.75), (0.9, 0.45))[variant]
        corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
    elif name == "triangle" and variant == 1:  # right-angled, centred on its centroid
        corners = [(-0.5, -1.0), (1.0, 0.5), (-0.5, 0.5)]
    elif name == "triangle":
        corners = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif name == "star":
        points = (5, 4, 6)[variant]
        corners = [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / points),
                    (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / points))
                   for i in range(2 * points)]
    elif name == "cross":
        a, b = (0.3, 0.14)[variant], 0.9
        corners = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                   (-b, a), (-b, -a), (-a, -a)]
    elif name == "hexagon" or name == "pentagon":
        n = 6 if name == "hexagon" else 5
        corners = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, n, endpoint=False)]
    elif name == "diamond":
        corners = [(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]
    elif name == "arrow":
        corners = [(-0.9, -0.25), (0.2, -0.25), (0.2, -0.65), (0.95, 0.0), (0.2, 0.65), (0.2, 0.25), (-0.9, 0.25)]
    elif name == "heart":
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        corners = list(zip(x / 17, (y + 2) / 17))
    elif name == "moon":
        outer = [(math.cos(t), math.sin(t)) for t in np.linspace(-math.pi / 2, math.pi / 2, 20)]
        inner = [(0.45 * math.cos(t), math.sin(t)) for t in np.linspace(math.pi / 2, -math.pi / 2, 20)]
        corners = outer + inner
    elif name == "ring":  # an annulus traced as one polygon with a thin cut
        outer = [(math.cos(t), math.sin(t)) for t in np.linspace(0.05, 2 * math.pi - 0.05, 36)]
        inner = [(0.55 * math.cos(t), 0.55 * math.sin(t)) for t in np.linspace(2 * math.pi - 0.05, 0.05, 36)]
        corners = outer + inner
    elif name == "semicircle":
        corners = [(math.cos(t), math.sin(t) + 0.4) for t in np.linspace(math.pi, 2 * math.pi, 24)]
    else:
        raise ValueError(f"unknown shape {name}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in corners]


def _contrasting(rng: np.random.Generator, background, low: int = 30, high: int = 226) -> tuple:
    """A random fill colour clearly distinct from ``background`` (so the shape is always visible)."""
    background = np.asarray(background, np.float32)
    for _ in range(50):
        colour = rng.integers(low, high, size=3)
        if np.abs(colour - background).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def _shade(tint, amount: float, base: float) -> tuple:
    """``tint`` mixed with grey level ``base``: amount 1 is the tint itself."""
    return tuple(int(round(base * (1 - amount) + t * amount)) for t in tint)


def draw(shape: str, domain: str, rng: np.random.Generator, size: int = 72, pattern: int | None = None,
         variant: int = 0) -> Image.Image:
    """One image of ``shape`` (``VARIANTS[shape][variant]``) in the style of ``domain`` on a randomly
    tinted background with ``PATTERNS[pattern]`` (None: a random pattern)."""
    image, points = _draw_style(shape, domain, rng, size, variant)
    return with_pattern(image, points, int(rng.integers(len(PATTERNS))) if pattern is None else pattern, rng)


def _draw_style(shape: str, domain: str, rng: np.random.Generator, size: int, variant: int) -> tuple:
    """The image and the shape's polygon, before the background pattern."""
    cx, cy = rng.uniform(0.38, 0.62, size=2) * size
    r = rng.uniform(0.24, 0.34) * size
    points = shape_points(shape, cx, cy, r, rng.uniform(0, 2 * math.pi), variant)
    hue = np.asarray(TINTS[int(rng.integers(len(TINTS)))], np.float32)
    if domain == "photo":  # smooth gradient background in the tint, shaded shape, sensor noise
        top, bottom = hue * rng.uniform(0.45, 0.8), hue * rng.uniform(0.45, 0.8) + rng.uniform(0, 40)
        ramp = np.linspace(0, 1, size)[:, None, None]
        background = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1)
        image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
        colour = _contrasting(rng, (top + bottom) / 2)
        ImageDraw.Draw(image).polygon(points, fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(1.0))
        pixels = np.asarray(image, np.float32) + rng.normal(0, 8, size=(size, size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), points
    if domain == "sketch":  # pencil outline on tinted paper, slightly jittered strokes
        image = Image.new("RGB", (size, size), _shade(hue, rng.uniform(0.25, 0.4), 250))
        pen = ImageDraw.Draw(image)
        for _ in range(2):
            wobble = [(x + rng.normal(0, 0.8), y + rng.normal(0, 0.8)) for x, y in points]
            pen.line(wobble + wobble[:1], fill=(40, 40, 40), width=1)
        return image, points
    if domain == "cartoon":  # flat saturated fill, thick black outline, plain pastel background
        background = _shade(hue, rng.uniform(0.35, 0.55), 255)
        image = Image.new("RGB", (size, size), background)
        pen = ImageDraw.Draw(image)
        pen.polygon(points, fill=_contrasting(rng, background))
        pen.line(points + points[:1], fill=(0, 0, 0), width=3)
        return image, points
    if domain == "pixel":  # low-resolution blocky rendering, two-colour palette, dark background
        small = max(size // 4, 8)
        scale = small / size
        background = _shade(hue, rng.uniform(0.3, 0.45), 0)
        image = Image.new("RGB", (small, small), background)
        ImageDraw.Draw(image).polygon([(x * scale, y * scale) for x, y in points],
                                      fill=_contrasting(rng, background, 90, 256))
        return image.resize((size, size), Image.NEAREST), points
    if domain == "painting":  # soft brushy colour fields, no outline
        background = _shade(hue, rng.uniform(0.4, 0.7), 160)
        image = Image.new("RGB", (size, size), background)
        ImageDraw.Draw(image).polygon(points, fill=_contrasting(rng, background))
        pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(2.0)), np.float32)
        strokes = rng.normal(0, 9, size=(size // 4 + 1, size // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:size, :size]
        return Image.fromarray(np.clip(pixels + strokes, 0, 255).astype(np.uint8), "RGB"), points
    if domain == "neon":  # glowing coloured outline on a near-black tinted background
        image = Image.new("RGB", (size, size), _shade(hue, 0.15, 0))
        glow = tuple(int(c) for c in rng.integers(120, 256, size=3))
        ImageDraw.Draw(image).line(points + points[:1], fill=glow, width=3)
        halo = image.filter(ImageFilter.GaussianBlur(2))
        return Image.fromarray(np.maximum(np.asarray(image), np.asarray(halo)), "RGB"), points
    raise ValueError(f"unknown domain {domain}")


def generate(root, per_class: int = 30, seed: int = 0, domains=DOMAINS, classes=CLASSES,
             shortcut: float | None = None) -> Path:
    """Write ``root/<domain>/<class>/<i>.png`` for every domain and class; returns root.

    Image sizes vary a little (64 to 88 pixels, not always square) so crops are exercised
    in source pixels. Each image's variant of its class is drawn at random. Backgrounds are plain;
    with ``shortcut`` a fraction, that fraction of each class's images has the background pattern
    ``pattern_of(class, domain)`` and the rest a random one. Existing files are left alone, so
    generating twice is a no-op.
    """
    root = Path(root)
    for d, domain in enumerate(domains):
        for c, shape in enumerate(classes):
            folder = root / domain / shape
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, d, c])
            for i in range(per_class):
                size = int(rng.integers(64, 89))
                pattern = 0 if shortcut is None else pattern_of(c, d) if rng.random() < shortcut else None
                variant = int(rng.integers(len(VARIANTS[shape])))
                image = draw(shape, domain, rng, size=size, pattern=pattern, variant=variant)
                if rng.random() < 0.3:  # some non-square images
                    image = image.resize((image.width, int(image.height * rng.uniform(0.8, 1.0))))
                path = folder / f"{i:03d}.png"
                if not path.exists():
                    image.save(path)
    return root
