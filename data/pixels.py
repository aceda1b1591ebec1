"""Filling and reading the student pixel cache (its format: ``cache/pixel_cache.py``).

The pixels are exactly ``InputSpec.resize(render(image, params))``, the uint8 array that
``InputSpec.__call__`` normalises, so ``normalise(cache) == spec(replay)`` bit for bit. ``build``
decodes each image once and renders all its views in DataLoader workers, block by block, into
the form's writer; ``PixelImages`` and ``PixelBatches`` read them back for training.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache import pixel_cache, store
from cache.pixel_cache import DEFAULT_FORM, PENDING, encode
from data import views as views_mod
from data.images import BadImage, load_image


# ------------------------------------------------------------------------------ rendering

def render_views(image: Image.Image, params: np.ndarray, spec: views_mod.InputSpec) -> np.ndarray:
    """All K views of one decoded image at ``spec``'s size: [K, S, S, 3] uint8."""
    out = np.empty((len(params), spec.size, spec.size, 3), np.uint8)
    for k, p in enumerate(params):
        out[k] = spec.resize(views_mod.render(image, p))
    return out


def render_row(path, params: np.ndarray, spec: views_mod.InputSpec) -> np.ndarray:
    """Decode ``path`` once (``load_image``, as replay does) and render its K views."""
    return render_views(load_image(path), params, spec)


class RenderedRows(torch.utils.data.Dataset):
    """Row -> (row, its K views as uint8 [K, S, S, 3]): each image decoded once for all its views
    (``normalise`` then gives exactly the tensors ``ReplayImages`` gives view by view)."""

    def __init__(self, root, paths, view_params: np.ndarray, spec: views_mod.InputSpec):
        self.root, self.paths, self.view_params, self.spec = Path(root), paths, view_params, spec

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        return int(row), torch.from_numpy(render_row(self.root / self.paths[row], self.view_params[row], self.spec))


def lookup_table(spec: views_mod.InputSpec) -> np.ndarray:
    """[3, 256] float32: ``InputSpec.__call__``'s own arithmetic applied to every byte value."""
    values = np.arange(256, dtype=np.float32)[:, None] / 255.0
    table = (values - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(table.T)


def normalise(pixels: torch.Tensor, spec: views_mod.InputSpec, device=None) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> float32 [B, 3, S, S], bit-identical to ``InputSpec.__call__``.

    Each byte is looked up in ``lookup_table(spec)``, which is ``InputSpec.__call__``'s float32
    arithmetic evaluated once for all 256 values (in NumPy, as ``__call__`` does), so the result
    is the same bits on any device whatever its division or fused-multiply-add rounding (CUDA,
    for one, divides by a scalar through its reciprocal). On a CUDA device the result is
    channels-last, as training wants it; on the CPU it is contiguous.
    """
    target = torch.device(device) if device is not None else pixels.device
    table = lookup_table(spec)
    if target.type == "cpu":
        x = pixels.cpu().numpy()
        out = np.empty((x.shape[0], 3, x.shape[1], x.shape[2]), np.float32)
        for c in range(3):
            np.take(table[c], x[..., c], out=out[:, c])
        return torch.from_numpy(out)
    return _gather(pixels.to(target, non_blocking=True), table)


def _gather(x: torch.Tensor, table: np.ndarray) -> torch.Tensor:
    """The device path of ``normalise``: a gather from the table, no arithmetic on the device."""
    flat = torch.from_numpy(table.reshape(-1)).to(x.device)
    offsets = torch.tensor([0, 256, 512], dtype=torch.int64, device=x.device)
    return flat[x.to(torch.int64) + offsets].permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------ writing

class _RenderRows(torch.utils.data.Dataset):
    """Row -> (row, [K, S, S, 3] uint8 or list of K encoded views, error). Decodes each image once."""

    def __init__(self, root, paths, view_params, spec, row_ok, form):
        self.root, self.paths, self.view_params, self.spec = Path(root), paths, view_params, spec
        self.row_ok, self.form = row_ok, form

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        n_views, size = self.view_params.shape[1], self.spec.size
        pixels, error = None, ""
        if self.row_ok is not None and not self.row_ok[row]:
            error = "not extracted"
        else:
            try:
                pixels = render_row(self.root / self.paths[row], self.view_params[row], self.spec)
            except BadImage as e:
                error = str(e)
        if self.form == "raw":
            return row, pixels if pixels is not None else np.zeros((n_views, size, size, 3), np.uint8), error
        return row, [encode(v, self.form) for v in pixels] if pixels is not None else [b""] * n_views, error


def _collate(items):
    rows, pixels, errors = zip(*items)
    if isinstance(pixels[0], np.ndarray):
        pixels = torch.from_numpy(np.stack(pixels))  # a tensor: leaves a worker through shared memory
    return list(rows), pixels, list(errors)


def build(path, root, paths, view_params: np.ndarray, spec: views_mod.InputSpec, *, source: dict,
          form: str = DEFAULT_FORM, row_ok=None, block: int = 32, workers: int = 0, force: bool = False,
          stop=None, progress=None) -> dict:
    """Fill the pixel cache ``path`` (created if missing, resumed if partial). Returns a summary.

    ``view_params`` [images, K, P] are the recorded views (``teacher.h5``); ``row_ok`` (bool per
    row) marks the rows the teacher extracted; the others are stored as failed. Rows are rendered
    in DataLoader workers in fixed blocks of ``block`` rows; a block's ``status`` is set only
    after its pixels are flushed. An existing cache for other views/images/size/form is refused
    (StalePixels) unless ``force``. ``stop`` (an object with ``.requested``) ends after the
    current block; ``progress`` (callable, rows done) is told after each block.
    """
    path = Path(path)
    n, n_views = view_params.shape[:2]
    out = pixel_cache.writer(path, spec, n, n_views, source, form, block, force)
    pending, done_now, failed = out.pending(), 0, []
    if pending:
        dataset = _RenderRows(root, paths, view_params, spec, row_ok, form)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in pending], num_workers=workers,
                                             collate_fn=_collate)
        batches = iter(loader)  # workers fork here, before the HDF5 file is opened
        with out.opened():
            for rows, payload, errors in batches:
                out.write(rows, payload, errors)
                done_now += len(rows)
                failed += [(r, e) for r, e in zip(rows, errors) if e]
                if progress is not None:
                    progress(len(rows))
                if stop is not None and stop.requested:
                    break
    out.finish()
    status = store.read(path, "status") if path.exists() else None
    return {"images": n, "views": n_views, "form": form, "rendered_now": done_now,
            "complete": bool(status is not None and (status != PENDING).all()),
            "failed_now": [{"row": int(r), "reason": e} for r, e in failed],
            "bytes": pixel_cache.size_on_disk(path) if path.exists() else None}


# ------------------------------------------------------------------------------ reading

class PixelImages(torch.utils.data.Dataset):
    """Item ``row * n_views + view`` -> (item, uint8 pixels [S, S, 3]) from the pixel cache.

    The drop-in counterpart of ``ReplayImages`` for training: normalisation happens on the
    training device (``normalise``). ``__getitems__`` reads a whole batch into one buffer.
    """

    def __init__(self, path, wanted: dict | None = None):
        self.reader = pixel_cache.PixelReader(path, wanted)
        self.n_views = self.reader.n_views

    def __len__(self):
        return self.reader.n_images * self.n_views

    def __getitem__(self, item):
        row, view = divmod(int(item), self.n_views)
        return int(item), torch.from_numpy(self.reader.read([row], [view])[0])

    def __getitems__(self, items):
        items = np.asarray(items, np.int64)
        pixels = torch.from_numpy(self.reader.read(items // self.n_views, items % self.n_views))
        return [(int(i), p) for i, p in zip(items, pixels)]


class PixelBatches:
    """Batches ``(items, uint8 pixels [B, S, S, 3])`` for the batches of ``batch_sampler``, read
    ahead by one background thread of this process: no worker processes, no shared-memory copies.

    Positional reads release the GIL, so reading overlaps the training step; each batch is read
    straight into its own (optionally pinned) buffer. At most ``prefetch`` batches wait in memory.
    The same batches, in the same order, as a DataLoader over ``PixelImages`` with that sampler.
    """

    def __init__(self, dataset: PixelImages, batch_sampler, prefetch: int = 2, pin_memory: bool = False):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.prefetch, self.pin_memory = max(1, prefetch), pin_memory

    def __len__(self):
        return len(self.batch_sampler)

    def _read(self, batch) -> tuple:
        items = torch.as_tensor(np.asarray(batch, np.int64))
        reader = self.dataset.reader
        out = torch.empty((len(items), reader.size, reader.size, 3), dtype=torch.uint8, pin_memory=self.pin_memory)
        reader.read(items.numpy() // reader.n_views, items.numpy() % reader.n_views, out=out.numpy())
        return items, out

    def __iter__(self):
        import queue
        import threading

        ready, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        end = object()

        def offer(result) -> bool:
            """Queue ``result`` unless the consumer has stopped (then False)."""
            while not stop.is_set():
                try:
                    ready.put(result, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.batch_sampler:
                    if stop.is_set() or not offer(self._read(batch)):
                        return
                result = end
            except BaseException as e:  # handed to the consumer, raised there
                result = e
            offer(result)

        thread = threading.Thread(target=produce, name="pixel-batches", daemon=True)
        thread.start()
        try:
            while True:
                result = ready.get()
                if result is end:
                    return
                if isinstance(result, BaseException):
                    raise result
                yield result
        finally:
            stop.set()
            thread.join()
