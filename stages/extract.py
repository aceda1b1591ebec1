"""Extract: the teacher's embeddings of every view of every image, and of every class prompt.

Writes one HDF5 store (``teacher.h5``):

- ``image_emb``   [images, views, dim] float16, L2-normalised
- ``view_params`` [images, views, len(PARAM_NAMES)] float32, the recorded view parameters
- ``status``      [images] uint8: 0 pending, 1 done, 2 skipped (bad image)
- ``text_emb``    [classes, templates, dim] float16, L2-normalised per prompt
- ``classifier``  [classes, dim] float16: templates averaged, then re-normalised
- ``rise_text_emb`` [classes, 7, dim] float16: RISE's 7-template prompts, and their
  ``rise_classifier`` [classes, dim] (the class ensemble)
- ``anchor_emb``  [classes, anchors, dim] float16: "a {d} of a {class}." for every domain name d
  and RISE's generic anchors (attribute ``anchor_names``)

Rows are written in order and ``status`` is set only after a row's embeddings are on disk, so
re-running after an interruption continues with the pending rows. Skipped images and their
reasons are appended to ``skipped.jsonl`` beside the store.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from cache import store
from data.images import ExtractionImages
from data.views import PARAM_NAMES, Augment
from stages.prompts import GENERIC_ANCHORS, TEMPLATE_SETS, anchor_prompts, class_prompt_name
from stages.teacher import text_classifier
from pipeline.progress import progress

# Attributes that must match for a store to be reused; any difference means a rebuild.
IDENTITY_KEYS = ("teacher", "pretrained", "checkpoint_sha256", "preprocess", "templates",
                 "views", "view_seed", "augment", "dataset_fingerprint", "format_version")


def store_attrs(teacher, index, templates: tuple, template_set: str, n_views: int,
                view_seed: int, augment: Augment, batch_size: int) -> dict:
    return {**teacher.identity, "template_set": template_set, "templates": list(templates),
            "views": n_views, "view_seed": view_seed, "augment": augment.to_dict(),
            "dataset_fingerprint": index.fingerprint, "classes": index.classes,
            "domains": index.domains, "images": len(index), "param_names": list(PARAM_NAMES),
            "anchor_names": index.domains + list(GENERIC_ANCHORS), "batch_size": batch_size,
            "format_version": store.FORMAT_VERSION}


def mismatches(existing: dict, wanted: dict) -> list:
    """Names of the identity attributes on which an existing store differs from the wanted one."""
    return [k for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]


def encode_prompts(teacher, prompts: list) -> torch.Tensor:
    return torch.cat([teacher.encode_texts(prompts[i:i + 256]) for i in range(0, len(prompts), 256)])


def encode_class_texts(teacher, classes: list, templates: tuple) -> torch.Tensor:
    """[classes, templates, dim] normalised text embeddings."""
    prompts = [t.format(class_prompt_name(c)) for c in classes for t in templates]
    return encode_prompts(teacher, prompts).reshape(len(classes), len(templates), -1)


def encode_anchors(teacher, classes: list, anchor_names: list) -> torch.Tensor:
    """[classes, anchors, dim] embeddings of "a {anchor} of a {class}."."""
    per_anchor = [encode_prompts(teacher, anchor_prompts(a, classes)) for a in anchor_names]
    return torch.stack(per_anchor, dim=1)


ROW_DATASETS = ("image_emb", "view_params", "status")


def extract(index, teacher, store_path, *, rank: int = 0, world: int = 1, **settings) -> dict:
    """Fill ``store_path`` (created if missing, resumed if partial). Returns a summary.

    Under ``torchrun`` (``world`` > 1) each rank fills its own shard of rows,
    ``shards/rank{r}-of-{world}.h5``; ``join_shards`` then makes ``store_path`` read exactly like
    a single-process cache. SIGINT stops cleanly after the current batch (raising ``Interrupted``).
    """
    with StopFlag() as stop:
        if world == 1:
            return _extract(index, teacher, Path(store_path), stop, range(len(index)), True, **settings)
        rows = shard_rows(len(index), settings["batch_size"], rank, world)
        return _extract(index, teacher, shard_path(store_path, rank, world), stop, rows, False, **settings)


def shard_rows(n_rows: int, block: int, rank: int, world: int) -> range:
    """The rows of one rank: a contiguous run of whole teacher batches."""
    n_blocks = -(-n_rows // block)
    first, last = rank * n_blocks // world, (rank + 1) * n_blocks // world
    return range(min(first * block, n_rows), min(last * block, n_rows))


def shard_path(store_path, rank: int, world: int) -> Path:
    return Path(store_path).parent / "shards" / f"rank{rank}-of-{world}.h5"


def _skipped_path(store_path: Path) -> Path:
    return store_path.with_name("skipped.jsonl" if store_path.parent.name != "shards"
                                else store_path.stem + ".skipped.jsonl")


def _text_embeddings(teacher, index, templates: tuple, anchor_names: list) -> dict:
    texts = {"text_emb": encode_class_texts(teacher, index.classes, templates),
             "rise_text_emb": encode_class_texts(teacher, index.classes, TEMPLATE_SETS["rise7"]),
             "anchor_emb": encode_anchors(teacher, index.classes, anchor_names)}
    texts["classifier"] = text_classifier(texts["text_emb"])
    texts["rise_classifier"] = text_classifier(texts["rise_text_emb"])
    return texts


def _row_datasets(n: int, n_views: int, dim: int) -> dict:
    return {"image_emb": ((n, n_views, dim), np.float16),
            "view_params": ((n, n_views, len(PARAM_NAMES)), np.float32),
            "status": ((n,), np.uint8)}


def _extract(index, teacher, store_path: Path, stop, rows: range, with_text: bool, *, templates: tuple,
             template_set: str, n_views: int, view_seed: int, augment: Augment = Augment(),
             batch_size: int = 64, workers: int = 0) -> dict:
    skipped_path = _skipped_path(store_path)
    if not store_path.exists():
        store_path.parent.mkdir(parents=True, exist_ok=True)
        attrs = store_attrs(teacher, index, templates, template_set, n_views, view_seed, augment, batch_size)
        texts = _text_embeddings(teacher, index, templates, attrs["anchor_names"]) if with_text else {}
        dim = teacher.encode_texts(["a"]).shape[-1]
        store.create(store_path, {**_row_datasets(len(rows), n_views, dim),
                                  **{name: (tuple(t.shape), np.float16) for name, t in texts.items()}},
                     {**attrs, "rows": [rows.start, rows.stop]})
        with h5py.File(store_path, "r+") as f:
            for name, t in texts.items():
                f[name][...] = t.numpy().astype(np.float16)
        skipped_path.unlink(missing_ok=True)

    # Batches are fixed blocks of rows, so a resumed (or sharded) run feeds the teacher exactly
    # the batches an uninterrupted single run would: same numerics, same bytes. A block is redone
    # if any of its rows is pending.
    block = int(store.read_attrs(store_path)["batch_size"])
    status = store.read(store_path, "status")
    blocks = [list(range(start, min(start + block, rows.stop))) for start in range(rows.start, rows.stop, block)
              if (status[start - rows.start:start - rows.start + block] == store.PENDING).any()]
    started, done_now = time.time(), 0
    if blocks:
        dataset = ExtractionImages(index.root, index.paths, n_views, view_seed, teacher.input_spec, augment)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=blocks, num_workers=workers,
                                             collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                                             worker_init_fn=_ignore_sigint)
        batches = iter(loader)  # workers fork here, before the HDF5 file is opened
        with h5py.File(store_path, "r+") as f, open(skipped_path, "a") as skipped, \
                progress(total=sum(map(len, blocks)), desc="extract", unit="img") as bar:
            for batch_rows, pixels, params, errors in batches:
                embeddings = teacher.encode_images(pixels.flatten(0, 1)).reshape(len(batch_rows), n_views, -1)
                ok = np.where([e == "" for e in errors], store.DONE, store.FAILED).astype(np.uint8)
                where = slice(int(batch_rows[0]) - rows.start, int(batch_rows[-1]) + 1 - rows.start)
                f["image_emb"][where] = embeddings.numpy().astype(np.float16)
                f["view_params"][where] = params.numpy()
                f.flush()  # a row is marked done only once its embeddings are on disk
                f["status"][where] = ok
                f.flush()
                for row, error in zip(batch_rows, errors):
                    if error:
                        skipped.write(json.dumps({"path": index.paths[row], "reason": error}) + "\n")
                skipped.flush()
                done_now += len(batch_rows)
                bar.update(len(batch_rows))
                if stop.requested:
                    raise Interrupted(f"extract: interrupted; {int((store.read(store_path, 'status') != 0).sum())} "
                                      f"of {len(rows)} images are cached; run the same command again to resume")
    seconds = time.time() - started
    final_status = store.read(store_path, "status")
    return {"images": len(rows), "extracted_now": done_now, "seconds": round(seconds, 2),
            "images_per_s": round(done_now / seconds, 1) if done_now else None,
            "ok": int((final_status == store.DONE).sum()),
            "skipped": int((final_status == store.FAILED).sum())}


def join_shards(index, teacher, store_path, world: int, *, templates: tuple, template_set: str, n_views: int,
                view_seed: int, augment: Augment = Augment(), batch_size: int = 64, **_) -> None:
    """Write ``store_path``: the text embeddings, and the row datasets as HDF5 virtual datasets over
    the rank shards (joined without copying; h5py, pandas and this tool read it as one array)."""
    store_path = Path(store_path)
    shards = [shard_path(store_path, rank, world) for rank in range(world)]
    attrs = store_attrs(teacher, index, templates, template_set, n_views, view_seed, augment, batch_size)
    texts = _text_embeddings(teacher, index, templates, attrs["anchor_names"])
    tmp = store_path.with_name(store_path.name + ".tmp")
    with h5py.File(tmp, "w", track_order=True) as f:
        for name in ROW_DATASETS:
            with h5py.File(shards[0], "r") as first:
                shape, dtype = (len(index), *first[name].shape[1:]), first[name].dtype
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            for rank, shard in enumerate(shards):
                rows = shard_rows(len(index), batch_size, rank, world)
                if len(rows):
                    layout[rows.start:rows.stop] = h5py.VirtualSource(
                        f"shards/{shard.name}", name, shape=(len(rows), *shape[1:]))
            f.create_virtual_dataset(name, layout)
        for name, t in texts.items():
            f[name] = t.numpy().astype(np.float16)
        store.write_attrs(f, {"format_version": store.FORMAT_VERSION, **attrs, "shards": world})
    os.replace(tmp, store_path)
    with open(_skipped_path(store_path), "w") as joined:
        for shard in shards:
            skipped = _skipped_path(shard)
            if skipped.exists():
                joined.write(skipped.read_text())


class Interrupted(Exception):
    """SIGINT: stopped cleanly after the current batch; everything written so far is kept."""


class StopFlag:
    """While active, SIGINT only sets ``requested``; the loop stops at the next batch boundary."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _ignore_sigint(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def _collate(items):
    rows = np.array([item[0] for item in items])
    pixels = torch.stack([item[1] for item in items])
    params = torch.stack([item[2] for item in items])
    return rows, pixels, params, [item[3] for item in items]


def skipped_reasons(store_path) -> dict:
    """path -> reason for every image that extraction skipped."""
    skipped_path = Path(store_path).with_name("skipped.jsonl")
    if not skipped_path.exists():
        return {}
    with open(skipped_path) as f:
        return {entry["path"]: entry["reason"] for entry in map(json.loads, f)}

