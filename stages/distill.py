"""Distill: train a student on replayed views against cached teacher targets.

No teacher in the loop: each step decodes the recorded views (in DataLoader workers), runs the
student forward and backward, and reads the teacher's embeddings of those exact views from
memory. Every ``eval_every`` steps the source-validation accuracy and loss are measured; the
model with the best accuracy is kept (DomainBed's training-domain validation) and, with SWAD,
the dense weight average over the loss valley as well (training stops where the valley ends).

At every validation the whole training state is checkpointed (temp file, then rename); a run
that was killed continues from there and ends with the same weights as an uninterrupted run.
"""
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file

from cache.errors import UserError
from cache.fingerprint import sha256_json
from cache.progress import Interrupted, StopFlag, progress, say
from cache.teacher_cache import TeacherCache
from data.cutmix import cutmix
from data.images import ReplayImages
from data.pixels import PixelBatches, normalise
from data.views import InputSpec
from data.sampling import BalancedViewSampler
from stages import distributed, stage
from stages.fit import require_finite, source_val_accuracy
from stages.pixels import FORMS as PIXEL_FORMS, StudentPixels
from stages.methods import BACKBONE, TEACHER, TEACHER_TOWER, Batch, method_named
from stages.runtime import device, loader
from stages.stage import Stage, require_positive, require_rates, save_outputs
from stages.student import create_backbone, feature_dim, resolved_weights, student_key
from stages.swad import LossValley, RunningAverage, Segment, restarts_segment
from stages.teacher import OpenClipTeacher


class Distill(Stage):
    """Train one method for one held-out domain and seed; save its best (and SWAD) weights.

    ``teacher_online`` runs the teacher on every replayed view instead of reading the cache:
    the official code's way, kept as the reference the cache is checked against. ``variant``
    names one point of a hyperparameter sweep (its own folder).
    """

    def __init__(self, run, method: str, holdout: str, *, student: str | None = None,
                 student_weights: str = "imagenet", student_size=None, steps: int, per_domain: int,
                 seed: int = 0, eval_every: int, workers: int = 0, hparams: dict | None = None,
                 cutmix: float = 0.0, swad: bool | None = None, anchors: str = "domains",
                 teacher_online: bool = False, variant: str | None = None, pixel_cache: str = "raw"):
        self.method = method_named(method)
        if pixel_cache not in PIXEL_FORMS:
            raise UserError(f"--pixel-cache must be one of {', '.join(PIXEL_FORMS)}, got '{pixel_cache}'")
        self.pixel_cache = pixel_cache
        require_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
        require_rates(hparams or {})
        if not self.method.trains:
            raise UserError(f"{method} has nothing to train; evaluate it directly")
        if not 0.0 <= cutmix <= 1.0:
            raise UserError(f"--cutmix is a probability in [0, 1], got {cutmix}")
        if teacher_online and self.method.student == TEACHER:
            raise UserError(f"--teacher-online applies to student methods, not {method}")
        self.run, self.holdout, self.seed, self.workers, self.anchors = run, holdout, seed, workers, anchors
        self.index = run.load_index()
        self.sources, self.train_rows, self.val_rows = self.index.sources(holdout)
        self.key, self.student = resolve_student(run, self.method, holdout, student, student_weights, student_size)
        self.inputs = run.teacher_cache_input()
        if self.method.needs_alignment:
            self.projection = run.align_dir(self.key, holdout) / "projection.safetensors"
            self.inputs[run.rel(self.projection)] = run.output_hash(self.projection)
        self.swad = self.method.swad if swad is None else bool(swad)
        self.hparams = {k: v for k, v in (hparams or {}).items() if v is not None}
        self.teacher_online = teacher_online
        self.config = {"method": self.method.name, "student": self.student, "steps": steps,
                       "per_domain": per_domain, "seed": seed, "eval_every": eval_every, "hparams": self.hparams,
                       "cutmix": cutmix, "swad": self.swad, "anchors": anchors,
                       **({"teacher_online": True} if teacher_online else {})}
        self.folder = run.distill_dir(self.method.name, self.key, holdout, seed, variant)

    def describe(self) -> str:
        return f"distill {self.method.name} for held-out '{self.holdout}' ({self.key}, seed {self.seed})"

    def check(self) -> None:
        rank, world = distributed.world()
        c = self.config
        if self.method.student != TEACHER and (c["per_domain"] * len(self.sources)) % world:
            raise UserError(f"--per-domain {c['per_domain']} x {len(self.sources)} source domains must split "
                            f"evenly over {world} processes")

    def compute(self) -> dict | None:
        c, cache = self.config, TeacherCache(self.run.teacher_cache)
        started = time.time()
        if self.method.student == TEACHER:
            state, log = self.method.fit(cache.image_emb, torch.as_tensor(self.index.label), self.train_rows,
                                         self.val_rows, steps=c["steps"], per_domain=c["per_domain"],
                                         seed=self.seed, eval_every=c["eval_every"], **self.hparams)
            weights = {"best": state}
        else:
            text = cache.text(anchor_names(cache, self.sources, self.anchors))
            model, spec = build_student(self.method, self.student, cache, text, teacher_weights=True)
            if self.method.needs_alignment:
                model.projection.load_state_dict(load_file(self.projection))
            # Frozen BatchNorm keeps pre-trained statistics; a random-init student has none to keep
            random_init = self.student.get("student_weights") == "none"
            trainer = self.method(model, text, c["steps"], freeze_batchnorm=False if random_init else None,
                                  **self.hparams)
            online = OnlineTargets(cached_teacher(cache)) if self.teacher_online else None
            pixel_spec = None
            if self.pixel_cache != "none" and online is None:  # the exact same pixels, rendered once
                pixels = StudentPixels(self.run, spec, form=self.pixel_cache, workers=self.workers)
                if distributed.is_main():  # under torchrun rank 0 renders; the others read once it is done
                    stage.run(pixels, quiet=True)
                distributed.barrier()
                dataset, pixel_spec = pixels.dataset(), spec
            else:
                dataset = ReplayImages(self.index.root, self.index.paths, cache.view_params, spec,
                                       teacher_spec=online.teacher.input_spec if online else None)
            cutmix_note = f", CutMix p={c['cutmix']}" if c["cutmix"] else ""
            say(f"distill: {self.method.name}, {self.student['student']} on {', '.join(self.sources)} -> held-out "
                f"'{self.holdout}', {c['steps']} steps of {c['per_domain']} images per domain"
                f"{', SWAD' if self.swad else ''}{cutmix_note}")
            resume = self.folder / "resume.pt"
            if self.force:
                resume.unlink(missing_ok=True)
            rank, world = distributed.world()
            weights, log = train(trainer, dataset, cache, self.index.label, self.train_rows, self.val_rows,
                                 steps=c["steps"], per_domain=c["per_domain"], seed=self.seed,
                                 eval_every=c["eval_every"], workers=self.workers, cutmix_p=c["cutmix"],
                                 swad=self.swad, resume_path=resume,
                                 resume_key=sha256_json({"config": c, "inputs": self.inputs}), online=online,
                                 rank=rank, world=world, pixel_spec=pixel_spec)
            if not distributed.is_main():
                return None  # checkpoints and results are written once, by rank 0
        self.outputs = save_outputs(self.folder, weights, {**c, "holdout": self.holdout, "sources": self.sources,
                                                           "student_key": self.key}, log)
        (self.folder / "resume.pt").unlink(missing_ok=True)
        return {**log[-1], "seconds": round(time.time() - started, 1)}

    def published(self, summary: dict) -> None:
        say(f"distill: {self.method.name} held-out '{self.holdout}': best source-val accuracy "
            f"{summary['best_source_val_acc']:.3f} at step {summary['best_step']} ({summary['seconds']} s)")


def resolve_student(run, method, holdout: str, student: str | None, student_weights: str,
                    student_size) -> tuple[str, dict]:
    """(folder key, description) of the student ``method`` trains for ``holdout``.

    ``student``: a timm model name; for methods that start from an alignment (or when omitted),
    it picks among the students aligned for ``holdout``.
    """
    if method.student in (TEACHER, TEACHER_TOWER):
        return method.student, {"student": method.student}
    if method.needs_alignment or student is None:
        key = run.aligned_student(holdout, student if method.needs_alignment else None)
        return key, json.loads((run.features_dir(key) / "student.json").read_text())
    return student_key(student, student_weights, student_size), {
        "student": student, "student_weights": student_weights, "student_size": student_size,
        "resolved_weights": resolved_weights(student, student_weights)}


def cached_teacher(cache: TeacherCache, weights: bool = True) -> OpenClipTeacher:
    """The teacher the cache was made with (its architecture only, without ``weights``)."""
    if str(cache.attrs["teacher"]).startswith("remote:"):
        raise UserError(f"this cache was extracted from a remote teacher service ({cache.attrs['teacher']}); this "
                        f"needs the teacher's weights (white-box); a remote teacher has none: extract with a "
                        f"local --teacher NAME --pretrained TAG instead")
    teacher = OpenClipTeacher(cache.attrs["teacher"], cache.attrs["pretrained"] if weights else None,
                              device=str(device()))
    if weights and teacher.identity["checkpoint_sha256"] != cache.attrs["checkpoint_sha256"]:
        raise UserError(f"the teacher checkpoint changed since extraction ({cache.attrs['teacher']}, "
                        f"{cache.attrs['pretrained']}); this needs the teacher the cache was made with")
    return teacher


def build_student(method, student: dict, cache: TeacherCache, text, teacher_weights: bool):
    """The method's model (untrained head) and its input spec, from a student description."""
    if method.student == TEACHER_TOWER:
        teacher = cached_teacher(cache, weights=teacher_weights)
        return method.build(teacher.model.visual.float(), cache.dim, text), teacher.input_spec
    assert method.student == BACKBONE
    backbone, spec = create_backbone(student["student"], student["student_weights"], student["student_size"])
    return method.build(backbone, feature_dim(backbone), text), spec


def anchor_names(cache: TeacherCache, sources: list, anchors: str) -> list:
    """RISE's relative-distance anchors: the source-domain names, or the generic photo anchors."""
    if anchors == "domains":
        return sources
    if anchors == "generic":
        return cache.generic_anchors()
    raise UserError(f"--anchors must be 'domains' or 'generic', got '{anchors}'")


class OnlineTargets:
    """The reference the cache must match: run the teacher on each replayed view, every step,
    as the official code does. Counts the teacher image forwards it spends."""

    def __init__(self, teacher):
        self.teacher, self.forwards = teacher, 0

    def __call__(self, items, teacher_pixels) -> torch.Tensor:
        self.forwards += len(items)
        return self.teacher.encode_images(teacher_pixels)


def train(method, dataset: ReplayImages, cache, labels: np.ndarray, train_rows_by_domain: list,
            val_rows_by_domain: list, *, steps: int, per_domain: int, seed: int = 0, eval_every: int = 100,
            workers: int = 0, cutmix_p: float = 0.0, cutmix_beta: float = 1.0, swad: bool = False,
            swad_valley: dict | None = None, resume_path=None, resume_key: str = "",
            online: OnlineTargets | None = None, rank: int = 0, world: int = 1,
            pixel_spec: InputSpec | None = None) -> tuple[dict, list]:
    """Run ``steps`` updates of ``method``. Returns ({"best": state, ["swad": state]}, log).

    Targets come from ``cache``, or with ``online`` from the teacher itself (``dataset`` then
    also yields the teacher's preprocessing of each view).

    Under torchrun (``world`` > 1) the model is wrapped in DistributedDataParallel and each rank
    decodes and trains on its slice of every global batch; gradients are averaged, so a step is
    the single-process step on the whole batch (BatchNorm statistics stay per rank on CPU).

    With ``resume_path``, training state is saved there at every validation and, if a saved
    state with the same ``resume_key`` exists, training continues from it.
    """
    torch.manual_seed(seed)
    run_device = device()
    model = method.model.to(run_device)
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if world > 1:
        if run_device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method.ddp = torch.nn.parallel.DistributedDataParallel(model)
    labels_t = torch.as_tensor(labels)
    rng = np.random.default_rng([seed, 1])
    valley = LossValley(**(swad_valley or {})) if swad else None
    segment, segment_start = RunningAverage(), 1
    best, log, losses, first_step = (-1.0, None, 0), [], [], 0

    saved = _load_resume(resume_path, resume_key)
    if saved is not None:
        model.load_state_dict(saved["model"])
        method.optimizer.load_state_dict(saved["optimizer"])
        if method.scheduler is not None:
            method.scheduler.load_state_dict(saved["scheduler"])
        rng.bit_generator.state = saved["cutmix_rng"]
        torch.set_rng_state(saved["torch_rng"])
        best, log, first_step = tuple(saved["best"]), saved["log"], saved["step"]
        if swad:
            valley.load_state_dict(saved["valley"])
            segment, segment_start = RunningAverage.from_state_dict(saved["segment"]), saved["segment_start"]

    def checkpoint(step: int) -> None:
        if resume_path is None or rank != 0:
            return
        state = {"key": resume_key, "step": step, "model": model.state_dict(),
                 "optimizer": method.optimizer.state_dict(),
                 "scheduler": method.scheduler.state_dict() if method.scheduler is not None else None,
                 "cutmix_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "best": list(best), "log": log, "valley": valley.state_dict() if swad else None,
                 "segment": segment.state_dict() if swad else None, "segment_start": segment_start}
        tmp = Path(str(resume_path) + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, resume_path)

    def to_device(pixels) -> torch.Tensor:
        if pixel_spec is not None:  # uint8 from the pixel cache, normalised on the training device
            return normalise(pixels, pixel_spec, run_device)
        return pixels.to(run_device, non_blocking=True)

    def make_batch(items, pixels, *teacher_pixels) -> Batch:
        images = to_device(pixels)
        if run_device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        targets = online(items, teacher_pixels[0]) if online is not None else cache.targets(items)
        return Batch(images, labels_t[items // dataset.n_views].to(run_device),
                     targets.to(run_device, non_blocking=True))

    def validate() -> tuple[float, float]:
        """Source-validation accuracy and loss: each the mean over the source domains."""
        correct, domain_losses = [], []
        for rows in val_rows_by_domain:
            hits, total_loss = [], 0.0
            for items, *pixels in loader(dataset, np.asarray(rows) * dataset.n_views, 128, 0):
                batch = make_batch(items, *pixels)
                logits, loss = method.score(batch)
                hits.append((logits.argmax(-1) == batch.labels).cpu().numpy())
                total_loss += loss * len(items)
            correct.append(np.concatenate(hits))
            domain_losses.append(total_loss / len(rows))
        return source_val_accuracy(correct), float(np.mean(domain_losses))

    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, dataset.n_views, seed, steps, first_step,
                                  rank=rank, world=world)
    if pixel_spec is not None:  # reads ahead in a thread: no worker processes, no copies between them
        batches = PixelBatches(dataset, sampler, pin_memory=run_device.type == "cuda")
    else:
        batches = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                              pin_memory=run_device.type == "cuda", persistent_workers=workers > 0)
    started, train_seconds = time.time(), 0.0
    with progress(total=steps, initial=first_step, desc=f"distill {method.name}", unit="step") as bar, \
            StopFlag() as stop:
        step_started = time.perf_counter()
        for step, (items, *pixels) in enumerate(batches, start=first_step + 1):
            batch = make_batch(items, *pixels)
            if cutmix_p and rng.random() < cutmix_p:
                mixed, perm, mix = cutmix(batch.images, rng, cutmix_beta)
                batch = Batch(mixed, batch.labels, batch.image_emb, batch.labels[perm], batch.image_emb[perm], mix)
            losses.append(_global_mean(method.update(batch)["loss"], world))
            require_finite(losses[-1], step, f"the last good state is kept in {resume_path}" if resume_path
                           else "nothing was saved")
            if swad:
                segment.add(model.state_dict())
            bar.update(1)
            train_seconds += time.perf_counter() - step_started
            if step % eval_every == 0 or step == steps:
                acc, val_loss = validate()
                log.append({"step": step, "loss": round(float(np.mean(losses)), 5), "source_val_acc": acc,
                            "source_val_loss": round(val_loss, 5), "seconds": round(time.time() - started, 1)})
                losses = []
                bar.set_postfix(loss=log[-1]["loss"], val=f"{acc:.3f}")
                if acc > best[0]:
                    best = (acc, copy.deepcopy(model.state_dict()), step)
                if swad:
                    frozen = {k: v.clone() for k, v in segment.state.items()}  # the segment may keep growing
                    valley.update(Segment(frozen, val_loss, segment_start, step))
                    if valley.dead_valley:
                        break  # the official trainer stops when the loss valley ends
                    if restarts_segment(step):
                        segment, segment_start = RunningAverage(), step + 1
                checkpoint(step)
                if stop.requested:
                    raise Interrupted(f"distill: interrupted at step {step} of {steps}; the state is saved, "
                                      f"run the same command again to continue")
            step_started = time.perf_counter()
    states = {"best": best[1]}
    summary = {"best_step": best[2], "best_source_val_acc": best[0],
               "teacher_image_forwards": online.forwards if online is not None else 0,
               "train_seconds_per_step": round(train_seconds / max(log[-1]["step"] - first_step, 1), 5)}
    if swad:
        # No BatchNorm re-estimation, as the official code with frozen BatchNorm
        model.load_state_dict(valley.final_state())
        states["swad"] = copy.deepcopy(model.state_dict())
        acc, val_loss = validate()
        summary.update(swad_converged=valley.converged, swad_segments=valley.segments_used,
                       swad_source_val_acc=acc, swad_stopped_at=log[-1]["step"] if valley.dead_valley else None)
    return states, log + [summary]


def _global_mean(value: float, world: int) -> float:
    """The loss of the whole global batch: the mean of the ranks' local means (equal slices)."""
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return total.item() / world


def _load_resume(path, key: str):
    """The saved training state, if there is one for this exact configuration."""
    if path is None or not Path(path).exists():
        return None
    saved = torch.load(path, weights_only=True)  # tensors and plain containers only: no code runs
    return saved if saved.get("key") == key else None
