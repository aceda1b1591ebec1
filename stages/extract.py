"""Extract: the teacher's embeddings of every view of every image, and of every class prompt.

The only stage that runs the teacher. It scans the dataset into ``index.parquet``, draws K views
per image, and fills the teacher cache (``teacher.h5``, layout in ``cache/teacher_cache.py``)
in fixed blocks of rows, so a killed run resumes with the pending blocks and ends with the same
bytes as an uninterrupted one. Skipped images and their reasons go to ``skipped.jsonl``.
"""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cache import store, teacher_cache
from cache.errors import UserError
from cache.index import write_table
from cache.progress import Interrupted, StopFlag, ignore_sigint, progress, say
from data import domainbed
from data.images import ExtractionImages
from data.views import PARAM_NAMES, Augment
from stages import distributed, remote_teacher, tracking
from stages.prompts import (GENERIC_ANCHORS, RISE_ANCHOR_TEMPLATE, RISE_TEMPLATES, anchor_prompts,
                            class_prompt_name, templates_named)
from stages.runfolder import teacher_name
from stages.runtime import device
from stages.stage import Stage
from stages.teacher import OpenClipTeacher, checkpoint_fingerprint, rise_ensemble, text_classifier

VIEWS = 8  # views per image by default (view 0 is the eval view)


class Extract(Stage):
    def __init__(self, run, data_root, *, teacher: str, pretrained, views: int = VIEWS, view_seed: int = 0,
                 template_set: str = "photo", val_fraction: float = 0.2, split_seed: int = 0,
                 batch_size: int = 64, workers: int = 0, max_queries: int | None = None,
                 teacher_concurrency: int = 4, rescan: bool = False, log: str = tracking.DEFAULT):
        if views < 1:
            raise UserError(f"--views must be at least 1, got {views}")
        self.log_to = log  # not in the config: tracking never changes what the stage computes
        # A teacher service: its metadata (read now, no query) gives the weights' fingerprint.
        self.remote = remote_teacher.RemoteTeacher(teacher, concurrency=teacher_concurrency, max_queries=max_queries) \
            if remote_teacher.is_remote(teacher) else None
        if self.remote:
            teacher, pretrained = self.remote.url, None  # recorded without credentials
        if teacher.startswith(("local-dir:", "hf-hub:")):
            pretrained = None  # the folder or repository holds the weights; a release tag would mean nothing
        # the run folder's first teacher in RUN/extract/, any other beside it (``RunFolder.extraction_of``)
        self.name = teacher_name({"teacher": self.remote.name if self.remote else teacher, "pretrained": pretrained})
        run = run.extraction_of(self.name)
        self.run, self.folder, self.data_root = run, run.extract_dir, data_root
        self.teacher_name, self.pretrained, self.template_set = teacher, pretrained, template_set
        self.templates = templates_named(template_set)
        self.n_views, self.view_seed, self.batch_size, self.workers = views, view_seed, batch_size, workers
        self.index = self._dataset(data_root, val_fraction, split_seed, rescan)
        self.augment = Augment()
        self.config = {"teacher": teacher, "pretrained": pretrained, "views": views, "view_seed": view_seed,
                       "templates": template_set, "val_fraction": val_fraction, "split_seed": split_seed,
                       "augment": self.augment.to_dict()}
        self.inputs = {"dataset": self.index.fingerprint,
                       "teacher_weights": self.remote.version if self.remote else
                       checkpoint_fingerprint(teacher, pretrained)}
        self.outputs = ["teacher.h5", "index.parquet"]
        self.force, self.teacher = False, None

    def _dataset(self, data_root, val_fraction: float, split_seed: int, rescan: bool):
        """The dataset's index. A full scan stats every image; the cached index serves instead when
        nothing says the tree changed: its domain and class folders' (mtime, inode) are as recorded
        (``domainbed.listing_fingerprint``) and the root and split are the same. ``rescan``: always scan."""
        if not rescan and self.run.index_path.exists():
            try:
                cached = self.run.load_index()
            except UserError:  # an unreadable index: the scan rebuilds it
                cached = None
            if cached is not None and cached.listing is not None and \
                    (cached.root, cached.val_fraction, cached.split_seed) == \
                    (Path(data_root).resolve(), val_fraction, split_seed) and \
                    cached.listing == domainbed.listing_fingerprint(data_root):
                return cached
        return domainbed.scan(data_root, val_fraction, split_seed)

    def describe(self) -> str:
        return f"extract ({len(self.index)} images, {self.n_views} views, teacher {self.teacher_name})"

    def wanted_attrs(self) -> dict:
        index = self.index
        return {**self.teacher.identity, "template_set": self.template_set, "templates": list(self.templates),
                "rise_templates": list(RISE_TEMPLATES) + [RISE_ANCHOR_TEMPLATE],
                "views": self.n_views, "view_seed": self.view_seed, "augment": self.augment.to_dict(),
                "dataset_fingerprint": index.fingerprint, "classes": index.classes, "domains": index.domains,
                "images": len(index), "param_names": list(PARAM_NAMES),
                "anchor_names": index.domains + list(GENERIC_ANCHORS), "batch_size": self.batch_size,
                "logit_scale": self.teacher.logit_scale, "logit_bias": self.teacher.logit_bias,
                "format_version": store.FORMAT_VERSION}

    def why_stale(self) -> str | None:
        """Also stale when the cache is unreadable, has pending blocks (a reader that found blocks
        not matching their checksums marks them so) or damaged text embeddings. Checked without
        re-hashing its blocks: every load verifies them."""
        return super().why_stale() or teacher_cache.to_repair(self.run.teacher_cache)

    def check(self) -> None:
        """Never mix: a cache made with another teacher, view set or dataset is refused."""
        rank, world = distributed.world()
        if self.remote and world > 1:
            raise UserError("a remote teacher extracts from one process; run without torchrun")
        self.teacher = self.remote or OpenClipTeacher(self.teacher_name, self.pretrained, device=str(device()))
        if not self.teacher.has_weights:
            say(f"warning: teacher {self.teacher_name} has no weights: using a random initialisation")
        if not self.run.holds_first_teacher:
            say(f"extract: teacher {self.name} is cached beside {next(iter(self.run.extracted_teachers()))}, in "
                f"{self.folder}; later stages use it (alone or in an ensemble) with --teachers")
        store_path = self.run.teacher_cache
        existing = store_path if store_path.exists() else self.run.shard(rank, world)
        if existing.exists() and not self.force and not store.readable(existing):
            say(f"extract: {existing} is damaged beyond repair (not a readable HDF5 file); rebuilding it")
            existing.unlink()
        if self.remote:
            self._plan_queries()
        if self.force or not existing.exists():
            return
        if world > 1 and store_path.exists() and store.read_attrs(store_path).get("shards") != world:
            raise UserError(f"{store_path} was extracted with another number of processes; resume with the "
                            f"same number, or use --force")
        cached = store.read_attrs(existing)
        differs = store.mismatches(cached, self.wanted_attrs(), teacher_cache.IDENTITY_KEYS)
        if differs:
            detail = "; ".join(self._dataset_change() if k == "dataset_fingerprint" else
                               f"{k}: cached {_short(cached.get(k))}, now {_short(self.wanted_attrs().get(k))}"
                               for k in differs)
            raise UserError(f"{self.run.root} holds a cache made with a different {', '.join(differs)} ({detail}); "
                            f"use --force to rebuild it, or a new --run folder")
        say(f"extract: resuming the cache in {self.folder}")

    def _plan_queries(self) -> None:
        """Count the queries a remote teacher will be sent and refuse more than --max-queries."""
        store_path = self.run.teacher_cache if not self.force else self.folder / "-"  # --force: all of them
        plan = self.remote.planned_queries(store_path, len(self.index), self.n_views, self.batch_size,
                                           remote_teacher.count_prompts(self.index, self.templates))
        self.remote.check_budget(plan)  # before anything is sent or changed
        say(f"extract: teacher service {self.remote.url}, model '{self.remote.model_name}' (dim {self.remote.dim}): "
            f"{plan['total']:,} queries planned ({plan['image']:,} image views + {plan['text']:,} prompts)")

    def _dataset_change(self) -> str:
        """What changed in the dataset since the cached index: added, removed, modified files."""
        if not self.run.index_path.exists():
            return "the dataset changed"
        cached = self.run.load_index()
        before = {p: (s, m) for p, s, m in zip(cached.paths, cached.size.tolist(), cached.mtime_ns.tolist())}
        now = {p: (s, m) for p, s, m in zip(self.index.paths, self.index.size.tolist(), self.index.mtime_ns.tolist())}
        added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
        changed = sum(1 for p in now.keys() & before.keys() if now[p] != before[p])
        return f"dataset: {added} images added, {removed} removed, {changed} modified since extraction"

    def compute(self) -> dict | None:
        rank, world = distributed.world()
        index, store_path = self.index, self.run.teacher_cache
        if self.force and distributed.is_main():  # everything but the lock this process holds
            for old in self.folder.iterdir():
                if old.name not in (".lock", "teachers"):  # nor the other teachers' caches
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        distributed.barrier()
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self.remote.attach(self.run.queries, self.run.received)
        say(f"extract: {len(index)} images in {len(index.domains)} domains, {len(index.classes)} classes; "
            f"{self.n_views} views each; teacher {self.teacher_name}" + (f"; {world} processes" if world > 1 else ""))
        rows = range(len(index)) if world == 1 else shard_rows(len(index), self.batch_size, rank, world)
        target = store_path if world == 1 else self.run.shard(rank, world)
        track = tracking.start(self.log_to, self.run, self.folder, self.config)
        try:
            with StopFlag() as stop:
                summary = self._fill(target, rows, stop, track)
        finally:
            track.close()
            if self.remote:
                self.remote.save_ledger()
        if self.remote:
            summary.update(self.remote.summary())
        if world > 1:
            distributed.barrier()  # every shard is complete
            if not distributed.is_main():
                return None
            shards = [self.run.shard(r, world) for r in range(world)]
            teacher_cache.join_shards(store_path, shards, [shard_rows(len(index), self.batch_size, r, world)
                                                           for r in range(world)], len(index),
                                      self._texts(), {**self.wanted_attrs(), "shards": world})
            with open(self.run.skipped_list(), "w") as joined:
                for shard in shards:
                    if self.run.skipped_list(shard).exists():
                        joined.write(self.run.skipped_list(shard).read_text())
            self.outputs = self.outputs + [s.relative_to(self.folder).as_posix() for s in shards]
        status = store.read(store_path, "status")
        summary.update(images=len(index), ok=int((status == store.DONE).sum()),
                       skipped=int((status == store.FAILED).sum()),
                       teacher_image_forwards=int((status == store.DONE).sum()) * self.n_views,
                       **({"processes": world} if world > 1 else {}))
        reasons = skipped_reasons(self.run.skipped_list())
        index.status = ["ok" if s == store.DONE else reasons.get(p, "skipped") for s, p in zip(status, index.paths)]
        write_table(self.run.index_path, *index.to_columns())
        if summary["ok"] == 0:
            raise UserError(f"none of the {len(index)} images in {self.data_root} could be read; "
                            f"reasons in {self.run.skipped_list()}")
        return summary

    def published(self, summary: dict) -> None:
        rate = f" ({summary['images_per_s']} images/s)" if summary["images_per_s"] else ""
        say(f"extract: done in {summary['seconds']} s{rate}; {summary['ok']} images cached")
        if summary["skipped"]:
            say(f"extract: skipped {summary['skipped']} unreadable images; list in {self.run.skipped_list()}")

    def _texts(self) -> dict:
        teacher, classes = self.teacher, self.index.classes
        texts = {"text_emb": encode_class_texts(teacher, classes, self.templates),
                 "rise_text_emb": encode_class_texts(teacher, classes, RISE_TEMPLATES, rise=True),
                 "anchor_emb": encode_anchors(teacher, classes, self.index.domains + list(GENERIC_ANCHORS))}
        texts["classifier"] = text_classifier(texts["text_emb"])
        texts["rise_classifier"] = rise_ensemble(texts["rise_text_emb"])
        return texts

    def _fill(self, store_path: Path, rows: range, stop: StopFlag, track: tracking.Tracker) -> dict:
        """Fill ``store_path`` (created if missing, resumed if partial) for ``rows``. ``track`` gets
        each block's images/s and the teacher queries sent so far, by the images cached."""
        index, n_views, teacher = self.index, self.n_views, self.teacher
        skipped_path = self.run.skipped_list(store_path)
        if not store_path.exists():
            store_path.parent.mkdir(parents=True, exist_ok=True)
            texts = self._texts() if store_path == self.run.teacher_cache else {}
            dim = texts["text_emb"].shape[-1] if texts else teacher.encode_texts(["a"]).shape[-1]
            teacher_cache.create(store_path, len(rows), n_views, len(PARAM_NAMES), dim, texts,
                                 {**self.wanted_attrs(), "rows": [rows.start, rows.stop]})
            skipped_path.unlink(missing_ok=True)

        # Batches are fixed blocks of rows, so a resumed (or sharded) run feeds the teacher exactly
        # the batches an uninterrupted single run would: same numerics, same bytes. A block is
        # redone if any of its rows is pending.
        damaged = teacher_cache.repair(store_path, self._texts)
        if damaged:
            say(f"extract: {damaged} blocks or text datasets of {store_path} were damaged; recomputing them")
        block = int(store.read_attrs(store_path)["batch_size"])
        status = store.read(store_path, "status")
        blocks = [list(range(rows.start + b.start, rows.start + b.stop)) for b in store.pending_blocks(status, block)]
        if blocks and (status != store.PENDING).any():
            say(f"extract: {len(blocks)} blocks to compute")
        started, done_now, queries = time.time(), 0, 0
        cached_before = int((status != store.PENDING).sum())
        if blocks:
            dataset = ExtractionImages(index.root, index.paths, n_views, self.view_seed, teacher.input_spec,
                                       self.augment)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=blocks, num_workers=self.workers,
                                                 collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                                                 worker_init_fn=ignore_sigint)
            batches = iter(loader)  # workers fork here, before the store is opened
            with store.Rows(store_path) as out, open(skipped_path, "a") as skipped, \
                    progress(total=sum(map(len, blocks)), desc="extract", unit="img") as bar:
                block_started = time.perf_counter()
                for batch_rows, pixels, params, errors in batches:
                    embeddings, sent = _encode_views(teacher, pixels, errors)
                    ok = np.where([e == "" for e in errors], store.DONE, store.FAILED).astype(np.uint8)
                    teacher_cache.write_block(out, int(batch_rows[0]) - rows.start, block, embeddings.numpy(),
                                              params.numpy(), ok)
                    for row, error in zip(batch_rows, errors):
                        if error:
                            skipped.write(json.dumps({"path": index.paths[row], "reason": error}) + "\n")
                    skipped.flush()
                    done_now += len(batch_rows)
                    bar.update(len(batch_rows))
                    queries += sent
                    self._track_block(track, cached_before + done_now,
                                      len(batch_rows) / (time.perf_counter() - block_started), queries)
                    block_started = time.perf_counter()
                    if stop.requested:
                        cached = int((store.read(store_path, "status") != store.PENDING).sum())
                        raise Interrupted(f"extract: interrupted; {cached} of {len(rows)} images are cached; "
                                          f"run the same command again to resume")
        seconds = time.time() - started
        final_status = store.read(store_path, "status")
        return {"images": len(rows), "extracted_now": done_now, "seconds": round(seconds, 2),
                "images_per_s": round(done_now / seconds, 1) if done_now else None,
                "ok": int((final_status == store.DONE).sum()),
                "skipped": int((final_status == store.FAILED).sum())}

    def _track_block(self, track: tracking.Tracker, cached: int, images_per_s: float, queries: int) -> None:
        """A block's scalars at the number of images cached: its images/s and the image queries this
        process has sent the teacher (a teacher service's ledger besides: every query sent, retried
        and failed over all runs into the folder)."""
        track.scalar("extract/images_per_s", images_per_s, cached)
        track.scalar("extract/teacher_queries", queries, cached)
        if self.remote:
            totals = self.remote.totals()
            for name in ("sent", "retried", "failed"):
                track.scalar(f"extract/service_queries/{name}", totals[name], cached)


def _encode_views(teacher, pixels: torch.Tensor, errors: list) -> tuple[torch.Tensor, int]:
    """[rows, views, ...] pixels -> ([rows, views, dim], views sent to the teacher). A teacher with
    ``skip_failed_rows`` (one that is paid per query) is not sent the blank views of unreadable
    images; their rows stay zero."""
    rows, n_views = pixels.shape[:2]
    ok = [i for i, e in enumerate(errors) if e == ""]
    if not getattr(teacher, "skip_failed_rows", False) or len(ok) == rows:
        return teacher.encode_images(pixels.flatten(0, 1)).reshape(rows, n_views, -1), rows * n_views
    out = torch.zeros(rows, n_views, teacher.dim)
    if ok:
        out[ok] = teacher.encode_images(pixels[ok].flatten(0, 1)).reshape(len(ok), n_views, -1)
    return out, len(ok) * n_views



def encode_prompts(teacher, prompts: list, normalize: bool = True) -> torch.Tensor:
    return torch.cat([teacher.encode_texts(prompts[i:i + 256], normalize=normalize)
                      for i in range(0, len(prompts), 256)])


def encode_class_texts(teacher, classes: list, templates: tuple, rise: bool = False) -> torch.Tensor:
    """[classes, templates, dim] text embeddings: VL2V's (class names with spaces, normalised), or
    with ``rise`` RISE's (folder names as they are, raw embeddings, as its ensemble averages them)."""
    prompts = [t.format(c if rise else class_prompt_name(c)) for c in classes for t in templates]
    return encode_prompts(teacher, prompts, normalize=not rise).reshape(len(classes), len(templates), -1)


def encode_anchors(teacher, classes: list, anchor_names: list) -> torch.Tensor:
    """[classes, anchors, dim] normalised embeddings of RISE's "a {anchor} of a {class}"."""
    per_anchor = [encode_prompts(teacher, anchor_prompts(a, classes)) for a in anchor_names]
    return torch.stack(per_anchor, dim=1)


def shard_rows(n_rows: int, block: int, rank: int, world: int) -> range:
    """The rows of one rank: a contiguous run of whole teacher batches."""
    n_blocks = -(-n_rows // block)
    first, last = rank * n_blocks // world, (rank + 1) * n_blocks // world
    return range(min(first * block, n_rows), min(last * block, n_rows))


def _collate(items):
    rows = np.array([item[0] for item in items])
    pixels = torch.stack([item[1] for item in items])
    params = torch.stack([item[2] for item in items])
    return rows, pixels, params, [item[3] for item in items]


def skipped_reasons(skipped_path: Path) -> dict:
    """path -> reason for every image that extraction skipped."""
    if not skipped_path.exists():
        return {}
    with open(skipped_path) as f:
        return {entry["path"]: entry["reason"] for entry in map(json.loads, f)}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
