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


def extract(index, teacher, store_path, **settings) -> dict:
    """Fill ``store_path`` (created if missing, resumed if partial). Returns a summary.

    SIGINT stops it cleanly after the current batch (raising ``Interrupted``).
    """
    with StopFlag() as stop:
        return _extract(index, teacher, store_path, stop, **settings)


def _extract(index, teacher, store_path, stop, *, templates: tuple, template_set: str, n_views: int,
             view_seed: int, augment: Augment = Augment(), batch_size: int = 64, workers: int = 0) -> dict:
    store_path = Path(store_path)
    skipped_path = store_path.with_name("skipped.jsonl")
    if not store_path.exists():
        attrs = store_attrs(teacher, index, templates, template_set, n_views, view_seed, augment, batch_size)
        texts = {"text_emb": encode_class_texts(teacher, index.classes, templates),
                 "rise_text_emb": encode_class_texts(teacher, index.classes, TEMPLATE_SETS["rise7"]),
                 "anchor_emb": encode_anchors(teacher, index.classes, attrs["anchor_names"])}
        texts["classifier"] = text_classifier(texts["text_emb"])
        texts["rise_classifier"] = text_classifier(texts["rise_text_emb"])
        n, k, dim = len(index), n_views, texts["text_emb"].shape[-1]
        store.create(store_path, {
            "image_emb": ((n, k, dim), np.float16),
            "view_params": ((n, k, len(PARAM_NAMES)), np.float32),
            "status": ((n,), np.uint8),
            **{name: (tuple(t.shape), np.float16) for name, t in texts.items()},
        }, attrs)
        with h5py.File(store_path, "r+") as f:
            for name, t in texts.items():
                f[name][...] = t.numpy().astype(np.float16)
        skipped_path.unlink(missing_ok=True)

    # Batches are fixed blocks of rows, so a resumed run feeds the teacher exactly the batches an
    # uninterrupted run would (same numerics, same bytes). A block is redone if any row is pending.
    block = int(store.read_attrs(store_path)["batch_size"])
    status = store.read(store_path, "status")
    blocks = [list(range(start, min(start + block, len(index))))
              for start in range(0, len(index), block) if (status[start:start + block] == store.PENDING).any()]
    started, done_now = time.time(), 0
    if blocks:
        dataset = ExtractionImages(index.root, index.paths, n_views, view_seed, teacher.input_spec, augment)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=blocks, num_workers=workers,
                                             collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                                             worker_init_fn=_ignore_sigint)
        batches = iter(loader)  # workers fork here, before the HDF5 file is opened
        with h5py.File(store_path, "r+") as f, open(skipped_path, "a") as skipped, \
                progress(total=sum(map(len, blocks)), desc="extract", unit="img") as bar:
            for rows, pixels, params, errors in batches:
                embeddings = teacher.encode_images(pixels.flatten(0, 1)).reshape(len(rows), n_views, -1)
                ok = np.where([e == "" for e in errors], store.DONE, store.FAILED).astype(np.uint8)
                where = slice(int(rows[0]), int(rows[-1]) + 1)
                f["image_emb"][where] = embeddings.numpy().astype(np.float16)
                f["view_params"][where] = params.numpy()
                f.flush()  # a row is marked done only once its embeddings are on disk
                f["status"][where] = ok
                f.flush()
                for row, error in zip(rows, errors):
                    if error:
                        skipped.write(json.dumps({"path": index.paths[row], "reason": error}) + "\n")
                skipped.flush()
                done_now += len(rows)
                bar.update(len(rows))
                if stop.requested:
                    raise Interrupted(f"extract: interrupted; {int((store.read(store_path, 'status') != 0).sum())} "
                                      f"of {len(index)} images are cached; run the same command again to resume")
    seconds = time.time() - started
    final_status = store.read(store_path, "status")
    return {"images": len(index), "extracted_now": done_now, "seconds": round(seconds, 2),
            "images_per_s": round(done_now / seconds, 1) if done_now else None,
            "ok": int((final_status == store.DONE).sum()),
            "skipped": int((final_status == store.FAILED).sum())}


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

