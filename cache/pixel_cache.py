"""The student pixel cache (``pixels.h5``): every recorded view rendered once at one student's
input size, so that training reads pixels and does nothing else on the CPU. Its layout, its two
writers (one per form) and its reader live here; the rendering that fills it is ``data/pixels.py``.

One file per student input spec (size, interpolation; mean and std are applied on the training
device and are not part of the pixels), shared by every method, held-out domain and seed. Row
``i`` is row ``i`` of the index and of ``teacher.h5``; view ``k`` is the view whose parameters
are ``view_params[i, k]``. The pixels are exactly ``InputSpec.resize(render(image, params))``,
the uint8 array that ``InputSpec.__call__`` normalises, so ``normalise(cache) == spec(replay)``
bit for bit.

Three forms (attribute ``form``):

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
  ``pixels.h5`` at the end.
- ``jpeg`` (opt-in, lossy): the same layout with each view a JPEG at quality 90, 4:4:4 (no
  chroma subsampling): about a tenth of raw, and the student sees a re-encoded view rather than
  the exact one whose teacher embedding is cached (a deviation, stated in the README).

All: ``view_crc32`` [images, views] uint32, the CRC32 of each stored view (its raw bytes, or its
encoding), checked on every read; ``status`` [images] uint8 (0 pending, 1 done, 2 failed), set only
after the block's pixels are on disk, and attributes: ``format`` ("pixels"), ``pixels_version``, ``form``, ``size``,
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
import zlib
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from cache import atomic, store
from cache.errors import BadImage
from cache.fingerprint import sha256_bytes


FORMAT = "pixels"
VERSION = 2  # 2: a CRC32 per view
DEFAULT_FORM = "raw"
PENDING, DONE, FAILED = store.PENDING, store.DONE, store.FAILED
# Each encoded form's Pillow format and options.
ENCODINGS = {"webp": ("WEBP", {"lossless": True, "method": 2, "quality": 50}),  # 0.38-0.44 x raw, ~11 ms/view
             "jpeg": ("JPEG", {"quality": 90, "subsampling": 0})}                # lossy: opt-in

# Attributes that must match for an existing cache to be reused; any difference is a rebuild.
CRC = "view_crc32"  # [images, views] uint32: CRC32 of each stored view, checked on every read
IDENTITY_KEYS = ("format", "pixels_version", "form", "size", "interpolation", "views", "images", "source")


class StalePixels(Exception):
    """An existing pixel cache was built for other views, images, size or form."""


class DamagedPixels(Exception):
    """Views whose bytes no longer match their CRC32 (``rows``: their rows)."""

    def __init__(self, path, rows):
        self.rows = sorted(set(int(r) for r in rows))
        super().__init__(f"{path}: {len(self.rows)} rows hold views that do not match their checksums")



# ------------------------------------------------------------------------------ identity

def source_identity(view_params: np.ndarray, dataset_fingerprint: str) -> dict:
    """What the pixels are rendered from: the images (fingerprint) and the recorded views."""
    params = np.ascontiguousarray(view_params, dtype=np.float32)
    return {"dataset_fingerprint": dataset_fingerprint,
            "view_params_sha256": sha256_bytes(params.tobytes() + str(params.shape).encode())}


def identity(spec, n_images: int, n_views: int, source: dict, form: str = DEFAULT_FORM) -> dict:
    if form not in FORMS:
        raise ValueError(f"unknown pixel cache form {form!r}; one of {', '.join(FORMS)}")
    return {"format": FORMAT, "pixels_version": VERSION, "form": form, "size": int(spec.size),
            "interpolation": spec.interpolation, "views": int(n_views), "images": int(n_images),
            "source": source}


def spec_key(spec) -> str:
    """A folder name for one student input size: the pixels depend on size and interpolation only."""
    return f"{spec.size}px-{spec.interpolation}"


def mismatches(existing: dict, wanted: dict) -> list:
    """Identity attributes on which an existing cache differs from the wanted one."""
    return store.mismatches(existing, wanted, IDENTITY_KEYS)


def check(path, wanted: dict) -> None:
    """Raise StalePixels naming what differs, if ``path`` is not a cache for ``wanted``."""
    differs = mismatches(store.read_attrs(path), wanted)
    if differs:
        raise StalePixels(f"{path}: pixel cache built for other {', '.join(differs)}; rebuild it (--force)")


# ------------------------------------------------------------------------------ writing

def encode(view: np.ndarray, form: str) -> bytes:
    """One view [S, S, 3] uint8 in an encoded form (``ENCODINGS``)."""
    buffer = io.BytesIO()
    image_format, options = ENCODINGS[form]
    Image.fromarray(view, "RGB").save(buffer, image_format, **options)
    return buffer.getvalue()


def decode(data, out: np.ndarray) -> None:
    with Image.open(io.BytesIO(data)) as image:
        out[...] = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)


NO_ROOM = "free space or use --pixel-cache webp|jpeg|none"


def _attrs(wanted: dict, block: int) -> dict:
    import PIL
    import torchvision
    return {**wanted, "block": block, "pillow": PIL.__version__, "torchvision": torchvision.__version__}


class RawWriter:
    """The raw form: ``pixels`` allocated whole at creation, each block written in place with its
    views' CRC32s, its ``status`` set once its pixels are on disk."""

    def __init__(self, path: Path, n: int, n_views: int, size: int, attrs: dict, blocks: list):
        self.path, self.block = path, attrs["block"]
        if not path.exists():
            store.create(path, {"pixels": ((n, n_views, size, size, 3), np.uint8), CRC: ((n, n_views), np.uint32),
                                "status": ((n,), np.uint8)}, attrs, advice=NO_ROOM)

    def pending(self) -> list:
        return store.pending_blocks(store.read(self.path, "status"), self.block)

    @contextmanager
    def opened(self):
        with store.Rows(self.path) as self._rows:
            yield self

    def write(self, rows: list, payload, errors: list) -> None:
        pixels = payload.numpy()
        self._rows.write("pixels", rows[0], pixels)
        self._rows.write(CRC, rows[0], view_crcs(pixels.reshape(*pixels.shape[:2], -1)))
        self._rows.sync()  # a row is marked done only once its pixels are on disk
        self._rows.write("status", rows[0], np.array([FAILED if e else DONE for e in errors], np.uint8))
        self._rows.sync()

    def finish(self) -> None:
        pass


def view_crcs(views) -> np.ndarray:
    """[rows, views] CRC32 of each view's bytes (raw pixels, or the encoded WebP)."""
    return np.array([[zlib.crc32(v) for v in row] for row in views], np.uint32).reshape(len(views), -1)


def mark_damaged(path) -> int:
    """Check every view of ``path`` against its CRC (after a read found damage) and mark the rows
    holding damaged views pending again, so the pixel stage renders them anew; their number."""
    reader, damaged = PixelReader(path), []
    done = np.flatnonzero(store.read(path, "status") == DONE)
    for start in range(0, len(done), 256):
        rows = np.repeat(done[start:start + 256], reader.n_views)
        try:
            reader.read(rows, np.tile(np.arange(reader.n_views), len(rows) // reader.n_views))
        except DamagedPixels as e:
            damaged += e.rows
    reader.close()
    with store.Rows(path) as out:
        out.mark_pending(range(row, row + 1) for row in damaged)
        out.sync()
    return len(damaged)


class EncodedWriter:
    """The encoded forms (webp, jpeg): each block a file in ``pixels.h5.parts/`` (renamed into place
    when complete), joined into ``pixels.h5`` once every block is there."""

    def __init__(self, path: Path, n: int, n_views: int, size: int, attrs: dict, blocks: list):
        self.path, self.n, self.n_views, self.attrs, self.blocks = path, n, n_views, attrs, blocks
        self.parts = parts_folder(path)
        if path.exists():
            return
        self.parts.mkdir(exist_ok=True)
        marker = self.parts / "identity.json"
        recorded = _read_marker(marker)
        if recorded is not None:
            if mismatches(recorded, attrs):
                raise StalePixels(f"{self.parts}: partial pixel cache for other settings; rebuild it (--force)")
            attrs["block"] = int(recorded["block"])  # parts are whole blocks: resume with the same ones
            self.blocks = store.blocks(n, attrs["block"])
        else:  # no readable marker: any parts are of unknown settings, so start the parts over
            shutil.rmtree(self.parts)
            self.parts.mkdir()
            atomic.write_bytes(marker, json.dumps({k: v for k, v in attrs.items() if k in (*IDENTITY_KEYS, "block")},
                                                  sort_keys=True).encode())

    def pending(self) -> list:
        if self.path.exists():
            return []
        return [b for b in self.blocks if not (self.parts / _part_name(b.start)).exists()]

    @contextmanager
    def opened(self):
        yield self

    def write(self, rows: list, payload, errors: list) -> None:
        _write_part(self.parts / _part_name(rows[0]), payload, errors)

    def finish(self) -> None:
        if not self.path.exists() and not self.pending():
            _join_parts(self.path, self.parts, self.blocks, self.n, self.n_views, self.attrs)


WRITERS = {"raw": RawWriter, "webp": EncodedWriter, "jpeg": EncodedWriter}
FORMS = tuple(WRITERS)
EXACT_FORMS = ("raw", "webp")  # their pixels are the rendered views, bit for bit


def writer(path, spec, n: int, n_views: int, source: dict, form: str, block: int, force: bool):
    """The writer of ``form`` for the pixel cache ``path`` (created, resumed, or with ``force`` started
    over). An existing cache for other views/images/size/form is refused (StalePixels) unless ``force``."""
    path = Path(path)
    wanted = identity(spec, n, n_views, source, form)
    if path.exists() and not store.readable(path):  # truncated or not HDF5: derived data, rendered anew
        path.unlink()
    if path.exists():
        if force:
            path.unlink()
        else:
            check(path, wanted)
    if force and parts_folder(path).exists():
        shutil.rmtree(parts_folder(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return WRITERS[form](path, n, n_views, spec.size, _attrs(wanted, block), store.blocks(n, block))


def _read_marker(marker: Path) -> dict | None:
    """The settings the parts were rendered with; None when missing or unreadable (a full disk)."""
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, ValueError):
        return None


def parts_folder(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _part_name(start: int) -> str:
    return f"rows{start:010d}.npz"


def _write_part(path: Path, encoded, errors) -> None:
    flat = [v for row in encoded for v in row]
    offsets = np.zeros(len(flat) + 1, np.int64)
    offsets[1:] = np.cumsum([len(v) for v in flat])
    data = np.frombuffer(b"".join(flat), np.uint8)
    status = np.array([FAILED if e else DONE for e in errors], np.uint8)
    with atomic.replacing(path, ".tmp.npz") as tmp:  # savez keeps a name that ends in .npz
        np.savez(tmp, data=data, offsets=offsets, status=status, crc=view_crcs(encoded))


def _join_parts(path: Path, parts: Path, blocks, n: int, n_views: int, attrs: dict) -> None:
    sizes = []
    for b in blocks:
        with np.load(parts / _part_name(b.start)) as part:
            sizes.append(int(part["offsets"][-1]))
    total = sum(sizes)
    with atomic.replacing(path, ".joining") as tmp:
        store.create(tmp, {"data": ((max(total, 1),), np.uint8), "offsets": ((n * n_views + 1,), np.int64),
                           CRC: ((n, n_views), np.uint32), "status": ((n,), np.uint8)}, attrs, advice=NO_ROOM,
                     name=path.name)
        with store.Rows(tmp) as out:
            base = 0
            for b, size in zip(blocks, sizes):
                with np.load(parts / _part_name(b.start)) as part:
                    if size:
                        out.write("data", base, part["data"])
                    out.write("offsets", b.start * n_views, part["offsets"] + base)
                    out.write(CRC, b.start, part["crc"])
                    out.write("status", b.start, part["status"])
                base += size
            out.sync()
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
                names = ("pixels", CRC, "status") if self.form == "raw" else ("data", "offsets", CRC, "status")
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

    def _view(self, fd: int, item: int, out: np.ndarray):
        """Read view ``item`` (row * views + view) into ``out``; returns the stored bytes (for the CRC)."""
        if self.form == "raw":
            got = os.preadv(fd, [memoryview(out).cast("B")], self._offsets["pixels"] + item * self.view_bytes)
            if got != self.view_bytes:
                raise OSError(f"{self.path}: short read ({got} of {self.view_bytes} bytes)")
            return memoryview(out).cast("B")
        start, stop = np.frombuffer(os.pread(fd, 16, self._offsets["offsets"] + item * 8), np.int64)
        data = os.pread(fd, int(stop - start), self._offsets["data"] + int(start))
        try:
            decode(data, out)
        except (OSError, ValueError):  # damaged beyond decoding: the CRC check names it
            pass
        return data

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
        damaged = []
        for i in np.argsort(flat, kind="stable"):
            stored = self._view(fd, int(flat[i]), out[i])
            expected = np.frombuffer(os.pread(fd, 4, self._offsets[CRC] + int(flat[i]) * 4), np.uint32)[0]
            if zlib.crc32(stored) != expected:
                damaged.append(rows[i])
        if damaged:
            raise DamagedPixels(self.path, damaged)
        return out


