"""The teacher cache, ``RUN/extract/teacher.h5``: its layout, identity, writer and reader.

Datasets (row ``i`` is row ``i`` of ``index.parquet``):

- ``image_emb``       [images, views, dim] float16, L2-normalised teacher embedding of each view
- ``view_params``     [images, views, len(PARAM_NAMES)] float32, the recorded view parameters
- ``status``          [images] uint8: 0 pending, 1 done, 2 skipped (bad image)
- ``block_sha256``    [blocks, 32] uint8: sha256 of each block's image_emb, view_params and status
  rows, written and read back before its status; checked on every load, so a damaged or silently
  lost write is found, and extraction recomputes just those blocks
- ``text_emb``        [classes, templates, dim] float16, L2-normalised per prompt
- ``classifier``      [classes, dim] float16: the templates averaged, then re-normalised (VL2V)
- ``rise_text_emb``   [classes, 7, dim] float16: RISE's 7-template prompts, raw (unnormalised),
  and ``rise_classifier`` [classes, dim]: their average, normalised (RISE's class ensemble)
- ``anchor_emb``      [classes, anchors, dim] float16: "a {d} of a {class}" for every name in
  the attribute ``anchor_names`` (every domain, then RISE's generic anchors)

Attributes: ``logit_scale`` and ``logit_bias`` (the teacher's logits are
``logit_scale * cos + logit_bias``; 100 and 0 where absent), the teacher's identity (``IDENTITY_KEYS``: a store is reused only when all of them
match), the templates, classes, domains, ``batch_size`` (the block of rows written at once) and
``text_sha256`` (the sha256 of each text dataset, written with them at creation and checked on
every load).
Row datasets are written block by block and ``status`` is set only after a block's embeddings
are on disk (fsynced) and read back equal to their checksum, so a killed extraction resumes with the pending blocks. Under torchrun each rank
writes a shard (``shards/rank{r}-of-{N}.h5``) and ``join_shards`` makes ``teacher.h5`` an HDF5
virtual dataset over them that reads exactly like a single-process store.
"""
import errno
import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from cache import atomic, store
from cache.errors import UserError
from cache.fingerprint import sha256_bytes

LOGIT_SCALE = 100.0  # OpenAI CLIP's exp(logit_scale): what a cache that records none was made with

ROW_DATASETS = ("image_emb", "view_params", "status")
CHECKSUMS = "block_sha256"
TEXT_CHECKSUMS = "text_sha256"  # attribute: name -> sha256 of each text dataset, set at creation
TEXT_DATASETS = ("text_emb", "classifier", "rise_text_emb", "rise_classifier", "anchor_emb")
# Attributes that must match for a store to be reused; any difference means a rebuild.
IDENTITY_KEYS = ("teacher", "pretrained", "checkpoint_sha256", "preprocess", "templates", "rise_templates",
                 "views", "view_seed", "augment", "dataset_fingerprint", "format_version")
# Attributes `pipeline info` shows.
DESCRIBED_KEYS = ("teacher", "pretrained", "checkpoint_sha256", "template_set", "templates", "views",
                  "view_seed", "augment", "preprocess", "dataset_fingerprint", "images", "format_version",
                  "remote", "logit_scale", "logit_bias")


def create(path, n_rows: int, n_views: int, n_params: int, dim: int, texts: dict, attrs: dict) -> None:
    """A new store with every row pending and the text embeddings written (with their checksums)."""
    texts = _as_stored(texts)
    datasets = {"image_emb": ((n_rows, n_views, dim), np.float16),
                "view_params": ((n_rows, n_views, n_params), np.float32),
                "status": ((n_rows,), np.uint8),
                CHECKSUMS: ((-(-n_rows // attrs["batch_size"]), 32), np.uint8),
                **{name: (t.shape, np.float16) for name, t in texts.items()}}
    store.create(path, datasets, {**attrs, TEXT_CHECKSUMS: {name: _sha256(t) for name, t in texts.items()}}, texts)


def _as_stored(texts: dict) -> dict:
    """Text embeddings (tensors) as the float16 arrays the store holds."""
    return {name: t.numpy().astype(np.float16) for name, t in texts.items()}


def _sha256(array: np.ndarray) -> str:
    return sha256_bytes(np.ascontiguousarray(array).tobytes())


def block_checksum(embeddings: np.ndarray, params: np.ndarray, status: np.ndarray) -> np.ndarray:
    digest = hashlib.sha256()
    for part in (embeddings, params, status):
        digest.update(np.ascontiguousarray(part).tobytes())
    return np.frombuffer(digest.digest(), np.uint8)


def write_block(rows: store.Rows, start: int, block: int, embeddings: np.ndarray, params: np.ndarray, status: np.ndarray) -> None:
    """One block of rows. Its status is written only once its data and checksum are on disk and read
    back intact: a full disk or a lost write raises, and the block stays pending."""
    embeddings = embeddings.astype(np.float16)
    checksum = block_checksum(embeddings, params, status)
    rows.write("image_emb", start, embeddings)
    rows.write("view_params", start, params)
    rows.write(CHECKSUMS, start // block, checksum[None])
    rows.sync()
    n = len(embeddings)
    if not np.array_equal(block_checksum(rows.read("image_emb", start, n), rows.read("view_params", start, n),
                                         status), checksum):
        raise OSError(errno.EIO, "written rows did not read back intact", str(rows.path))
    rows.write("status", start, status)
    rows.sync()


def damaged_blocks(f: h5py.File, emb: np.ndarray, params: np.ndarray) -> list:
    """Blocks marked done or skipped whose rows (``emb``, ``params``: read from ``f``) no longer
    match their checksum."""
    if CHECKSUMS not in f:
        return []  # a store written before checksums existed
    block, status, checksums = int(f.attrs["batch_size"]), f["status"][()], f[CHECKSUMS][()]
    return [b for b in range(len(checksums)) if (status[b * block:(b + 1) * block] != store.PENDING).any()
            and not np.array_equal(block_checksum(emb[b * block:(b + 1) * block], params[b * block:(b + 1) * block],
                                                  status[b * block:(b + 1) * block]), checksums[b])]


def damaged_texts(f: h5py.File) -> list:
    """Text datasets that no longer match the checksums recorded at creation."""
    recorded = store.attributes(f).get(TEXT_CHECKSUMS, {})
    return [name for name, digest in recorded.items() if _sha256(f[name][()]) != digest]


def to_repair(path) -> str | None:
    """What a fresh-looking store still needs, checked cheaply (no block is re-hashed): pending
    blocks (unfinished, or marked by a reader that found them damaged), damaged text datasets."""
    with store.reading(path) as f:
        if (f["status"][()] == store.PENDING).any():
            return "teacher.h5 has blocks to compute"
        return "teacher.h5 has damaged text embeddings" if damaged_texts(f) else None


def _mark_pending(path, blocks: list, block: int, n_rows: int) -> None:
    """Damaged blocks found by a reader: pending again, so the next extraction recomputes them.
    A read-only cache is left as it is (the error still names the damage)."""
    try:
        with store.Rows(path) as rows:
            rows.mark_pending(_row_ranges(blocks, block, n_rows))
            rows.sync()
    except OSError:
        pass


def _row_ranges(blocks: list, block: int, n_rows: int) -> list:
    """The rows of the blocks numbered ``blocks``."""
    every = store.blocks(n_rows, block)
    return [every[b] for b in blocks]


def repair(path, texts) -> int:
    """Mark the damaged blocks of a store pending again, so extraction recomputes only them, and
    rewrite damaged text datasets from ``texts()`` (the teacher's embeddings, computed on demand)."""
    with store.reading(path) as f:
        damaged = damaged_blocks(f, f["image_emb"][()], f["view_params"][()])
        bad_texts = damaged_texts(f)
        recorded, block = store.attributes(f).get(TEXT_CHECKSUMS, {}), int(f.attrs["batch_size"])
        n_rows = len(f["status"])
    with store.Rows(path) as rows:
        rows.mark_pending(_row_ranges(damaged, block, n_rows))
        if bad_texts:
            fresh = _as_stored(texts())
            for name in bad_texts:
                if _sha256(fresh[name]) != recorded[name]:
                    raise UserError(f"{path}: the teacher's {name} now differs from the one recorded at "
                                    f"extraction; rebuild the cache with --force")
                rows.write(name, 0, fresh[name])
        rows.sync()
    return len(damaged) + len(bad_texts)


def join_shards(path, shards: list, shard_rows: list, n_rows: int, texts: dict, attrs: dict) -> None:
    """Write ``path``: text embeddings, and row datasets as virtual datasets over the shards
    (no copy; relative paths, so the folder can be moved)."""
    path = Path(path)
    with atomic.replacing(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        block = attrs["batch_size"]
        for name in (*ROW_DATASETS, CHECKSUMS):
            # the checksums are per block, and every shard holds whole blocks
            per = block if name == CHECKSUMS else 1
            with h5py.File(shards[0], "r") as first:
                shape, dtype = (-(-n_rows // per), *first[name].shape[1:]), first[name].dtype
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            for shard, rows in zip(shards, shard_rows):
                if len(rows):
                    start, stop = rows.start // per, -(-rows.stop // per)
                    layout[start:stop] = h5py.VirtualSource(
                        f"{Path(shard).parent.name}/{Path(shard).name}", name, shape=(stop - start, *shape[1:]))
            f.create_virtual_dataset(name, layout)
        texts = _as_stored(texts)
        for name, t in texts.items():
            f[name] = t
        store.write_attrs(f, {"format_version": store.FORMAT_VERSION, **attrs,
                              TEXT_CHECKSUMS: {name: _sha256(t) for name, t in texts.items()}})


@dataclass
class TextTargets:
    """The teacher's text side."""

    classifier: torch.Tensor  # [C, D] the chosen templates, averaged and normalised
    ensemble: torch.Tensor    # [C, D] RISE's 7-template ensemble, averaged and normalised
    anchors: torch.Tensor     # [C, A, D] "a {d} of a {class}." for the chosen anchor names d
    logit_scale: float = LOGIT_SCALE  # the teacher's logits: ``logit_scale * cos + logit_bias``
    logit_bias: float = 0.0


class TeacherCache:
    """The store, its image embeddings mapped from the file (read when touched, never copied whole:
    memory does not grow with the dataset) and the rest in memory; every block checked on load."""

    def __init__(self, path):
        self.path = Path(path)
        with store.reading(self.path) as f:  # one open for the attributes, the rows and the texts
            self.attrs = store.attributes(f)
            image_emb, self.view_params = store.mapped(self.path, "image_emb"), f["view_params"][()]
            damaged = damaged_blocks(f, image_emb, self.view_params)
            bad_texts = damaged_texts(f)
            self.classifier, self.ensemble, self.anchor_emb = (
                torch.from_numpy(f[name][()]).float() for name in ("classifier", "rise_classifier", "anchor_emb"))
        if damaged:
            _mark_pending(self.path, damaged, int(self.attrs["batch_size"]), len(image_emb))
        if damaged or bad_texts:
            what = ", ".join(([f"{len(damaged)} blocks of rows"] if damaged else []) + bad_texts)
            raise UserError(f"{self.path} is damaged: {what} do not match their checksums; "
                            f"{store.repair_hint(self.path)} (only those are recomputed)")
        self.image_emb = torch.from_numpy(image_emb)  # float16
        self.n_views = self.image_emb.shape[1]
        self.anchor_names = self.attrs["anchor_names"]
        # caches written before these were recorded were all made with OpenAI-style teachers
        self.logit_scale = float(self.attrs.get("logit_scale", LOGIT_SCALE))
        self.logit_bias = float(self.attrs.get("logit_bias", 0.0))

    @property
    def dim(self) -> int:
        return self.image_emb.shape[-1]

    def targets(self, items: torch.Tensor) -> torch.Tensor:
        """Teacher image embeddings (float32) of flat items ``row * n_views + view``."""
        return self.image_emb.flatten(0, 1)[items].float()

    def generic_anchors(self) -> list:
        return [a for a in self.anchor_names if a not in self.attrs["domains"]]

    def text(self, anchors: list) -> TextTargets:
        """The text targets, with RISE's anchors restricted to the given anchor names."""
        chosen = [self.anchor_names.index(a) for a in anchors]
        return TextTargets(classifier=self.classifier, ensemble=self.ensemble, anchors=self.anchor_emb[:, chosen],
                           logit_scale=self.logit_scale, logit_bias=self.logit_bias)


# What teachers must share to be averaged: the same images, views and prompts.
ENSEMBLE_KEYS = ("dataset_fingerprint", "views", "view_seed", "augment", "classes", "domains", "anchor_names",
                 "templates")


def ensemble(caches: list, names: list) -> TeacherCache:
    """The teachers' ensemble, as DataCompDR's multi-teacher targets: per view (and per class text)
    the mean of the L2-normalised embeddings, re-normalised. Its logit rule is the teachers' mean."""
    first = caches[0]
    for name, cache in zip(names[1:], caches[1:]):
        differs = [k for k in ENSEMBLE_KEYS if cache.attrs.get(k) != first.attrs.get(k)]
        if cache.dim != first.dim:
            differs.insert(0, f"embedding size ({first.dim} and {cache.dim})")
        elif not differs and not np.array_equal(cache.view_params, first.view_params):
            differs = ["view parameters"]
        if differs:
            raise UserError(f"teachers {names[0]} and {name} cannot be ensembled: they differ in "
                            f"{', '.join(differs)}; extract both with the same dataset, --views, --view-seed "
                            f"and --templates")
    mixed = TeacherCache.__new__(TeacherCache)
    mixed.path, mixed.view_params, mixed.n_views, mixed.anchor_names = None, first.view_params, first.n_views, \
        first.anchor_names
    mixed.attrs = {**first.attrs, "teacher": "ensemble:" + "+".join(names), "pretrained": None,
                   "teachers": [{k: c.attrs[k] for k in ("teacher", "pretrained", "checkpoint_sha256")}
                                for c in caches]}
    mixed.image_emb = torch.empty_like(first.image_emb)
    for start in range(0, len(first.image_emb), 4096):  # float32 a chunk at a time, not the whole cache
        part = slice(start, start + 4096)
        mixed.image_emb[part] = mean_direction([c.image_emb[part] for c in caches]).to(torch.float16)
    mixed.classifier, mixed.ensemble, mixed.anchor_emb = (
        mean_direction([getattr(c, name) for c in caches]) for name in ("classifier", "ensemble", "anchor_emb"))
    mixed.logit_scale = float(np.mean([c.logit_scale for c in caches]))
    mixed.logit_bias = float(np.mean([c.logit_bias for c in caches]))
    return mixed


def mean_direction(embeddings: list) -> torch.Tensor:
    """``normalise(mean_i normalise(e_i))`` over the last dimension."""
    return F.normalize(torch.stack([F.normalize(e.float(), dim=-1) for e in embeddings]).mean(0), dim=-1)
