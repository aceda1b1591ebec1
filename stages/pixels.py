"""Student pixels: every recorded view rendered once at the student's input size.

Training then reads uint8 pixels (format: ``cache/pixel_cache.py``; rendering: ``data/pixels.py``)
and normalises them on the training device:
no decoding, no rendering on the CPU. One cache per input size and interpolation, shared by every
method, held-out domain and seed; decode-and-render stays as the reference and the fallback.
"""
from cache import pixel_cache, space, store
from cache.progress import Interrupted, StopFlag, progress, say
from data import pixels
from data.views import InputSpec
from stages.stage import Stage

FORMS = (*pixel_cache.FORMS, "none")  # none: decode and render every step (the reference path)
# Encoded size against raw (upper estimates): measured 0.38-0.50 (lossless WebP) and 0.18 (JPEG 90)
# on photographs at 224 px.
SHARE = {"webp": 0.5, "jpeg": 0.2}


class StudentPixels(Stage):
    def __init__(self, run, spec: InputSpec, *, form: str = pixel_cache.DEFAULT_FORM, workers: int = 0):
        self.run, self.spec, self.form, self.workers = run, spec, form, workers
        self.folder = run.pixels_dir(pixel_cache.spec_key(spec))
        self.config = {"size": spec.size, "interpolation": spec.interpolation, "form": form}
        self.inputs = run.teacher_cache_input()
        self.outputs = ["pixels.h5"]

    @property
    def path(self):
        return self.folder / "pixels.h5"

    def why_stale(self) -> str | None:
        """Also stale when pixels.h5 was damaged: unreadable, or rows marked again for rendering
        because their views failed their checksums (``pixel_cache.mark_damaged``)."""
        why = super().why_stale()
        if why is None and (store.read(self.path, "status") == store.PENDING).any():
            return "pixels.h5 has rows to render again"
        return why

    def describe(self) -> str:
        return f"student pixels ({pixel_cache.spec_key(self.spec)}, {self.form})"

    def compute(self) -> dict:
        index = self.run.load_index()
        view_params = store.read(self.run.teacher_cache, "view_params")
        row_ok = store.read(self.run.teacher_cache, "status") == store.DONE
        source = pixel_cache.source_identity(view_params, index.fingerprint)
        raw = len(index) * view_params.shape[1] * self.spec.size ** 2 * 3
        size = space.human(raw) if self.form == "raw" else f"about {space.human(raw * SHARE[self.form])}"
        say(f"pixels: rendering {int(row_ok.sum())} images x {view_params.shape[1]} views at "
            f"{self.spec.size} px ({self.form}, {size}) into {self.path}")
        with StopFlag() as stop, progress(total=len(index), desc="pixels", unit="img") as bar:
            settings = dict(source=source, form=self.form, row_ok=row_ok, workers=self.workers, stop=stop,
                            progress=bar.update)
            try:
                summary = pixels.build(self.path, index.root, index.paths, view_params, self.spec,
                                       force=self.force, **settings)
            except pixel_cache.StalePixels:  # rendered from other views: derived data, rebuilt
                summary = pixels.build(self.path, index.root, index.paths, view_params, self.spec, force=True,
                                       **settings)
            if stop.requested:
                raise Interrupted("pixels: interrupted; run the same command again to continue")
        return {**summary, "bytes": pixel_cache.size_on_disk(self.path)}

    def dataset(self) -> "pixels.PixelImages":
        return pixels.PixelImages(self.path)
