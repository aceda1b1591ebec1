"""The student pixel cache (``pixels.h5``): every recorded view rendered once at one student's
input size, so that training reads pixels and does nothing else on the CPU. Its layout, writer
and reader live here, beside the replay it caches (it renders with ``data.views``).

One file per student input spec (size, interpolation; mean and std are applied on the training
device and are not part of the pixels), shared by every method, held-out domain and seed. Row
``i`` is row ``i`` of the index and of ``teacher.h5``; view ``k`` is the view whose parameters
are ``view_params[i, k]``. The pixels are exactly ``InputSpec.resize(render(image, params))``,
the uint8 array that ``InputSpec.__call__`` normalises, so ``normalise(cache) == spec(replay)``
bit for bit.

Two forms (attribute ``form``):

- ``raw`` (default): ``pixels`` [images, views, S, S, 3] uint8, contiguous and allocated at
  creation, so a view is one run of S*S*3 bytes at a fixed offset and the writer never touches
  the file's metadata (a killed writer leaves a readable file whose ``status`` says what is
  done). K x 3 x S^2 bytes per image: 1.2 MB for 8 views at 224 px. Reading a view is one
  ``pread`` into the batch buffer.
- ``webp``: each view encoded as lossless WebP (exact: decoding gives the same bytes), stored
  back to back in ``data`` [total] uint8 with ``offsets`` [images * views + 1] int64. About
  0.4 x raw on natural images; decoding costs about 1 ms of CPU per view at 224 px, so it is for
  datasets whose raw cache does not fit on disk. It is written in blocks to
  ``pixels.h5.parts/`` (each block a file renamed into place when complete) and joined into
  ``pixels.h5`` at the end. A lossy form (JPEG, lossy WebP) is deliberately not offered: the
  teacher embedded the exactly rendered view, so a student trained on lossy pixels would no
  longer see the view whose target is cached.

Both: ``status`` [images] uint8 (0 pending, 1 done, 2 failed), set only after the block's pixels
are on disk, and attributes: ``format`` ("pixels"), ``pixels_version``, ``form``, ``size``,
``interpolation``, ``views``, ``images``, ``source`` (dataset fingerprint and the sha256 of the
view parameters the pixels were rendered from), ``block``, and for information the Pillow and
torchvision versions that rendered them.

The reader never loads the file: each process opens it on first use (after DataLoader workers
have forked) and reads the requested (row, view) pairs with positional reads; its memory does
not depend on the number of images.
"""
import io
import json
import os
import shutil
import threading
from contextlib import nullcontext
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from cache import store
from cache.fingerprint import sha256_bytes, sha256_json
from data import views as views_mod
from data.images import BadImage, load_image

FORMAT = "pixels"
VERSION = 1
FORMS = ("raw", "webp")
DEFAULT_FORM = "raw"
PENDING, DONE, FAILED = store.PENDING, store.DONE, store.FAILED
WEBP_OPTIONS = {"lossless": True, "method": 2, "quality": 50}  # measured: 0.38-0.44 x raw, ~11 ms/view encode

# Attributes that must match for an existing cache to be reused; any difference is a rebuild.
IDENTITY_KEYS = ("format", "pixels_version", "form", "size", "interpolation", "views", "images", "source")


class StalePixels(Exception):
    """An existing pixel cache was built for other views, images, size or form."""


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


# ------------------------------------------------------------------------------ identity

def source_identity(view_params: np.ndarray, dataset_fingerprint: str) -> dict:
    """What the pixels are rendered from: the images (fingerprint) and the recorded views."""
    params = np.ascontiguousarray(view_params, dtype=np.float32)
    return {"dataset_fingerprint": dataset_fingerprint,
            "view_params_sha256": sha256_bytes(params.tobytes() + str(params.shape).encode())}


def identity(spec: views_mod.InputSpec, n_images: int, n_views: int, source: dict, form: str = DEFAULT_FORM) -> dict:
    if form not in FORMS:
        raise ValueError(f"unknown pixel cache form {form!r}; one of {', '.join(FORMS)}")
    return {"format": FORMAT, "pixels_version": VERSION, "form": form, "size": int(spec.size),
            "interpolation": spec.interpolation, "views": int(n_views), "images": int(n_images),
            "source": source}


def spec_key(spec: views_mod.InputSpec) -> str:
    """A folder name for one student input size: the pixels depend on size and interpolation only."""
    return f"{spec.size}px-{spec.interpolation}"


def mismatches(existing: dict, wanted: dict) -> list:
    """Identity attributes on which an existing cache differs from the wanted one."""
    return [k for k in IDENTITY_KEYS if _json(existing.get(k)) != _json(wanted.get(k))]


def _json(value):
    return sha256_json(value) if value is not None else None


def check(path, wanted: dict) -> None:
    """Raise StalePixels naming what differs, if ``path`` is not a cache for ``wanted``."""
    differs = mismatches(store.read_attrs(path), wanted)
    if differs:
        raise StalePixels(f"{path}: pixel cache built for other {', '.join(differs)}; rebuild it (--force)")


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
        return row, [encode_webp(v) for v in pixels] if pixels is not None else [b""] * n_views, error


def _collate(items):
    rows, pixels, errors = zip(*items)
    if isinstance(pixels[0], np.ndarray):
        pixels = torch.from_numpy(np.stack(pixels))  # a tensor: leaves a worker through shared memory
    return list(rows), pixels, list(errors)


def encode_webp(view: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(view, "RGB").save(buffer, "WEBP", **WEBP_OPTIONS)
    return buffer.getvalue()


def decode_webp(data, out: np.ndarray) -> None:
    with Image.open(io.BytesIO(data)) as image:
        out[...] = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


def _preallocate(f: h5py.File, name: str, shape, dtype) -> None:
    """A contiguous dataset whose space is allocated now (and never filled): later writes only
    touch raw data."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    tid = h5py.h5t.py_create(np.dtype(dtype), logical=True)
    h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(tuple(shape)), dcpl=dcpl)


def _create(path: Path, datasets: dict, attrs: dict, fill: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", track_order=True) as f:
        for name, (shape, dtype) in datasets.items():
            _preallocate(f, name, shape, dtype)
        for name, data in fill.items():
            f[name][...] = data
        store.write_attrs(f, attrs)
    os.replace(tmp, path)


def _attrs(wanted: dict, block: int) -> dict:
    import PIL
    import torchvision
    return {**wanted, "block": block, "pillow": PIL.__version__, "torchvision": torchvision.__version__}


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
    wanted = identity(spec, n, n_views, source, form)
    parts = path.with_name(path.name + ".parts")
    if path.exists():
        if force:
            path.unlink()
        else:
            check(path, wanted)
    if force and parts.exists():
        shutil.rmtree(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = _attrs(wanted, block)
    blocks = _blocks(n, block)
    if form == "raw":
        if not path.exists():
            _create(path, {"pixels": ((n, n_views, spec.size, spec.size, 3), np.uint8), "status": ((n,), np.uint8)},
                    attrs, {"status": np.zeros(n, np.uint8)})
        status = store.read(path, "status")
        pending = [b for b in blocks if (status[b.start:b.stop] == PENDING).any()]
    else:
        if path.exists():
            pending = []
        else:
            parts.mkdir(exist_ok=True)
            marker = parts / "identity.json"
            if marker.exists():
                recorded = json.loads(marker.read_text())
                if mismatches(recorded, wanted):
                    raise StalePixels(f"{parts}: partial pixel cache for other settings; rebuild it (--force)")
                block = int(recorded["block"])  # parts are whole blocks: resume with the same ones
                attrs["block"] = block
                blocks = _blocks(n, block)
            else:
                marker.write_text(json.dumps({**wanted, "block": block}, sort_keys=True))
            pending = [b for b in blocks if not (parts / _part_name(b.start)).exists()]
    done_now, failed = 0, []
    if pending:
        dataset = _RenderRows(root, paths, view_params, spec, row_ok, form)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in pending], num_workers=workers,
                                             collate_fn=_collate)
        batches = iter(loader)  # workers fork here, before the HDF5 file is opened
        with h5py.File(path, "r+") if form == "raw" else nullcontext() as f:
            for rows, payload, errors in batches:
                if form == "raw":
                    where = slice(rows[0], rows[-1] + 1)
                    f["pixels"][where] = payload.numpy()
                    store.durable(f)  # a row is marked done only once its pixels are on disk
                    f["status"][where] = [FAILED if e else DONE for e in errors]
                    store.durable(f)
                else:
                    _write_part(parts / _part_name(rows[0]), payload, errors)
                done_now += len(rows)
                failed += [(r, e) for r, e in zip(rows, errors) if e]
                if progress is not None:
                    progress(len(rows))
                if stop is not None and stop.requested:
                    break
    if form == "webp" and not path.exists() and all((parts / _part_name(b.start)).exists() for b in blocks):
        _join_parts(path, parts, blocks, n, n_views, attrs)
    status = store.read(path, "status") if path.exists() else None
    return {"images": n, "views": n_views, "form": form, "rendered_now": done_now,
            "complete": bool(status is not None and (status != PENDING).all()),
            "failed_now": [{"row": int(r), "reason": e} for r, e in failed],
            "bytes": size_on_disk(path) if path.exists() else None}


def _blocks(n: int, block: int) -> list:
    """The rows of every block: fixed runs of ``block`` rows, the last one shorter."""
    return [range(start, min(start + block, n)) for start in range(0, n, block)]


def _part_name(start: int) -> str:
    return f"rows{start:010d}.npz"


def _write_part(path: Path, encoded, errors) -> None:
    flat = [v for row in encoded for v in row]
    offsets = np.zeros(len(flat) + 1, np.int64)
    offsets[1:] = np.cumsum([len(v) for v in flat])
    data = np.frombuffer(b"".join(flat), np.uint8)
    status = np.array([FAILED if e else DONE for e in errors], np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, data=data, offsets=offsets, status=status)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _join_parts(path: Path, parts: Path, blocks, n: int, n_views: int, attrs: dict) -> None:
    sizes = []
    for b in blocks:
        with np.load(parts / _part_name(b.start)) as part:
            sizes.append(int(part["offsets"][-1]))
    total = sum(sizes)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", track_order=True) as f:
        _preallocate(f, "data", (max(total, 1),), np.uint8)
        _preallocate(f, "offsets", (n * n_views + 1,), np.int64)
        _preallocate(f, "status", (n,), np.uint8)
        base = 0
        for b in blocks:
            with np.load(parts / _part_name(b.start)) as part:
                size = int(part["offsets"][-1])
                if size:
                    f["data"][base:base + size] = part["data"]
                f["offsets"][b.start * n_views:b.stop * n_views + 1] = part["offsets"] + base
                f["status"][b.start:b.stop] = part["status"]
                base += size
        store.write_attrs(f, attrs)
    os.replace(tmp, path)
    shutil.rmtree(parts)


def size_on_disk(path) -> int:
    """Bytes the cache occupies on disk (allocated blocks; the raw form is allocated up front)."""
    st = os.stat(path)
    return int(min(st.st_size, st.st_blocks * 512)) if hasattr(st, "st_blocks") else int(st.st_size)


def describe(path) -> dict:
    """For ``pipeline info``: form, size and completeness of a pixel cache, without reading pixels."""
    attrs = store.read_attrs(path)
    status = store.read(path, "status")
    return {"form": attrs["form"], "size": attrs["size"], "views": attrs["views"], "images": attrs["images"],
            "bytes": size_on_disk(path), "apparent_bytes": os.path.getsize(path), "bytes_per_image": round(size_on_disk(path) / max(attrs["images"], 1)),
            "done": int((status == DONE).sum()), "failed": int((status == FAILED).sum()),
            "pending": int((status == PENDING).sum())}


# ------------------------------------------------------------------------------ reading

_OPEN_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_OPEN_LOCK=threading.Lock()))


class PixelReader:
    """Random access to (row, view) pixels of a pixel cache, by positional reads.

    Nothing is opened at construction; each process opens the file on first use, so a reader
    built before DataLoader workers fork is safe in every worker. Memory does not grow with the
    number of images: only the requested views are read, straight into the output buffer.
    """

    def __init__(self, path, wanted: dict | None = None):
        self.path = Path(path)
        attrs = store.read_attrs(self.path)  # opened and closed again: nothing stays open
        if wanted is not None:
            differs = mismatches(attrs, wanted)
            if differs:
                raise StalePixels(f"{self.path}: pixel cache built for other {', '.join(differs)}; rebuild it")
        if attrs.get("format") != FORMAT:
            raise StalePixels(f"{self.path}: not a pixel cache")
        self.form, self.size = attrs["form"], int(attrs["size"])
        self.n_images, self.n_views = int(attrs["images"]), int(attrs["views"])
        self.view_bytes = self.size * self.size * 3
        self._pid, self._fd, self._offsets = None, None, {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_pid=None, _fd=None, _offsets={})
        return state

    def _open(self) -> int:
        if self._pid == os.getpid():
            return self._fd
        with _OPEN_LOCK:  # a reader thread and the main thread may both be first
            if self._pid == os.getpid():
                return self._fd
            with h5py.File(self.path, "r") as f:
                names = ("pixels", "status") if self.form == "raw" else ("data", "offsets", "status")
                for name in names:
                    ds = f[name]
                    if ds.chunks is not None or ds.compression is not None or ds.id.get_offset() is None:
                        raise ValueError(f"{self.path}: dataset {name} is not contiguous")
                    self._offsets[name] = ds.id.get_offset()
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
            return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._pid, self._fd = None, None

    def status(self, rows) -> np.ndarray:
        fd = self._open()
        rows = np.asarray(rows, np.int64)
        base = self._offsets["status"]
        return np.array([os.pread(fd, 1, base + int(r))[0] for r in rows], np.uint8)

    def read(self, rows, views, out: np.ndarray | None = None) -> np.ndarray:
        """Pixels of the pairs (rows[i], views[i]): [B, S, S, 3] uint8 (into ``out`` if given)."""
        fd = self._open()
        rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_images or views.min() < 0
                          or views.max() >= self.n_views):
            raise IndexError("pixel cache row or view out of range")
        if out is None:
            out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
        bad = self.status(rows) != DONE
        if bad.any():
            raise BadImage(f"{self.path}: rows {sorted(set(rows[bad].tolist()))} have no cached pixels "
                           f"(failed or not yet built)")
        flat = rows * self.n_views + views
        if self.form == "raw":
            base = self._offsets["pixels"]
            for i in np.argsort(flat, kind="stable"):
                want = self.view_bytes
                got = os.preadv(fd, [memoryview(out[i]).cast("B")], base + int(flat[i]) * want)
                if got != want:
                    raise OSError(f"{self.path}: short read ({got} of {want} bytes)")
        else:
            base_off, base_data = self._offsets["offsets"], self._offsets["data"]
            for i in np.argsort(flat, kind="stable"):
                start, stop = np.frombuffer(os.pread(fd, 16, base_off + int(flat[i]) * 8), np.int64)
                decode_webp(os.pread(fd, int(stop - start), base_data + int(start)), out[i])
        return out


class PixelImages(torch.utils.data.Dataset):
    """Item ``row * n_views + view`` -> (item, uint8 pixels [S, S, 3]) from the pixel cache.

    The drop-in counterpart of ``ReplayImages`` for training: normalisation happens on the
    training device (``normalise``). ``__getitems__`` reads a whole batch into one buffer.
    """

    def __init__(self, path, wanted: dict | None = None):
        self.reader = PixelReader(path, wanted)
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
