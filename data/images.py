"""Torch datasets that decode images and render views, for extraction and for training.

Both go through ``load_image`` and ``views.render``, so the student sees exactly the pixels
whose teacher embedding is cached.
"""
import signal
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache.errors import BadImage
from data import views

Image.MAX_IMAGE_PIXELS = 16_000 * 16_000  # larger images are refused as decompression bombs


DECODE_SECONDS = 30.0  # a file that takes longer to decode is skipped, never hangs the run


@contextmanager
def time_limit(seconds: float):
    """Raise BadImage if the block runs longer than ``seconds`` (main thread of a process only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise BadImage(f"decoding took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_image(path, timeout: float = DECODE_SECONDS) -> Image.Image:
    """Decode any supported image to 8-bit RGB, or raise BadImage with a reason."""
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return _to_rgb(image)
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise BadImage(f"too large: {e}") from None
    except PermissionError as e:
        raise BadImage(f"cannot read: {e.strerror}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode: {e}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):  # 16- or 32-bit integer grayscale
        pixels = np.asarray(image, dtype=np.float64)
        sixteen_bit = image.mode.startswith("I;16") or pixels.max() > 255
        image = Image.fromarray(np.clip(pixels / (257.0 if sixteen_bit else 1.0), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ExtractionImages(torch.utils.data.Dataset):
    """Row -> (row, all K views preprocessed for the teacher, their parameters, error)."""

    def __init__(self, root, paths, n_views: int, view_seed: int, spec: views.InputSpec,
                 augment: views.Augment = views.Augment()):
        self.root, self.paths = Path(root), paths
        self.n_views, self.view_seed, self.spec, self.augment = n_views, view_seed, spec, augment

    def __len__(self):
        return len(self.paths)

    def views(self, row: int) -> tuple[list, np.ndarray]:
        """The rendered views (PIL, source resolution) of one image and their parameters."""
        image = load_image(self.root / self.paths[row])
        params = views.sample_views(self.paths[row], image.width, image.height,
                                    self.n_views, self.view_seed, self.augment)
        return [views.render(image, p) for p in params], params

    def __getitem__(self, row):
        try:
            rendered, params = self.views(row)
            pixels = torch.stack([self.spec(v) for v in rendered])
            error = ""
        except BadImage as e:
            pixels = torch.zeros(self.n_views, 3, self.spec.size, self.spec.size)
            params = np.zeros((self.n_views, views.N_PARAMS), np.float32)
            error = str(e)
        return row, pixels, torch.from_numpy(params), error


class ReplayImages(torch.utils.data.Dataset):
    """Item ``row * n_views + view`` -> (item, the recorded view preprocessed for the student).

    With ``teacher_spec`` (online-teacher mode) the same view preprocessed for the teacher is
    appended: (item, student pixels, teacher pixels).
    """

    def __init__(self, root, paths, view_params: np.ndarray, spec: views.InputSpec,
                 teacher_spec: views.InputSpec | None = None):
        self.root, self.paths, self.view_params, self.spec = Path(root), paths, view_params, spec
        self.teacher_spec = teacher_spec
        self.n_views = view_params.shape[1]

    def __len__(self):
        return len(self.paths) * self.n_views

    def view(self, row: int, view: int) -> Image.Image:
        return views.render(load_image(self.root / self.paths[row]), self.view_params[row, view])

    def __getitem__(self, item):
        row, view = divmod(int(item), self.n_views)
        pixels = self.view(row, view)
        if self.teacher_spec is None:
            return int(item), self.spec(pixels)
        return int(item), self.spec(pixels), self.teacher_spec(pixels)
