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
import io
import time
from pathlib import Path

import numpy as np
import torch

from safetensors.torch import load_file

from cache import atomic, pixel_cache, space
from cache.errors import UserError
from cache.fingerprint import sha256_json
from cache.progress import Interrupted, StopFlag, progress, say
from data.cutmix import cutmix
from data.images import ReplayImages
from data.pixels import PixelBatches, normalise
from data.views import InputSpec
from data.sampling import BalancedViewSampler
from stages import distributed, tracking
from stages.fit import require_finite, source_val_accuracy, track_step
from stages.pixels import FORMS as PIXEL_FORMS, StudentPixels
from stages.methods import Batch, TrainJob, method_named
from stages.runtime import device, loader
from stages.stage import Stage, require_positive, require_rates, save_outputs
from stages.swad import SwadTracker
from stages.teacher import teacher_of_cache


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
                 teacher_online: bool = False, variant: str | None = None, pixel_cache: str = "raw",
                 log: str = tracking.DEFAULT):
        self.method = method_named(method)
        if pixel_cache not in PIXEL_FORMS:
            raise UserError(f"--pixel-cache must be one of {', '.join(PIXEL_FORMS)}, got '{pixel_cache}'")
        self.pixel_cache = pixel_cache
        self.log_to = log  # not in the config: tracking never changes what the stage computes
        require_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
        require_rates(hparams or {})
        if not self.method.trains:
            raise UserError(f"{method} has nothing to train; evaluate it directly")
        if not 0.0 <= cutmix <= 1.0:
            raise UserError(f"--cutmix is a probability in [0, 1], got {cutmix}")
        self.run, self.holdout, self.seed, self.workers = run, holdout, seed, workers
        self.index = run.load_index()
        self.sources, self.train_rows, self.val_rows = self.index.sources(holdout)
        self.key, self.student = self.method.resolve(run, holdout, student, student_weights, student_size)
        self.inputs = run.teachers_input()
        self.projection = None
        if self.method.needs_alignment:
            self.projection = run.align_dir(self.key, holdout) / "projection.safetensors"
            self.inputs[run.rel(self.projection)] = run.output_hash(self.projection)
        self.swad = self.method.swad if swad is None else bool(swad)
        self.hparams = {k: v for k, v in (hparams or {}).items() if v is not None}
        self.teacher_online = teacher_online
        self.pixels = None  # the student pixel stage, when training reads the pixel cache (``upstream``)
        self.config = {"method": self.method.name, "student": self.student, "steps": steps,
                       "per_domain": per_domain, "seed": seed, "eval_every": eval_every, "hparams": self.hparams,
                       "cutmix": cutmix, "swad": self.swad, "anchors": anchors,
                       **({"teacher_online": True} if teacher_online else {})}
        self.folder = run.distill_dir(self.method.name, self.key, holdout, seed, variant)

    def describe(self) -> str:
        return f"distill {self.method.name} for held-out '{self.holdout}' ({self.key}, seed {self.seed})"

    def check(self) -> None:
        rank, world = distributed.world()
        self.method.check_settings(per_domain=self.config["per_domain"], n_sources=len(self.sources), world=world,
                                   teacher_online=self.teacher_online)
        # loaded (and its checksums verified) before any upstream work: a damaged cache refuses
        # the command before the pixel stage renders anything from it
        self.cache = self.run.load_teacher()

    def upstream(self) -> list:
        """The student pixel cache at the student's input size: the exact pixels, rendered once."""
        if self.pixel_cache == "none" or self.teacher_online:
            return []
        spec = self.method.input_spec(self.student, self.cache.attrs)
        if spec is None:
            return []
        self.pixels = StudentPixels(self.run, spec, form=self.pixel_cache, workers=self.workers)
        return [self.pixels]

    def compute(self) -> dict | None:
        cache = self.cache
        started = time.time()
        track = tracking.start(self.log_to, self.run, self.folder, self.config)
        job = TrainJob(cache=cache, labels=torch.as_tensor(self.index.label), train_rows=self.train_rows,
                       val_rows=self.val_rows, sources=self.sources, student=self.student, config=self.config,
                       hparams=self.hparams, projection=load_file(self.projection) if self.projection else None,
                       train=lambda trainer, spec: self._train(trainer, spec, cache, track), track=track)
        try:
            weights, log = self.method.fit(job)
        except pixel_cache.DamagedPixels:  # found on read: every damaged row marked, rendered again next time
            rows = pixel_cache.mark_damaged(self.pixels.path)
            raise UserError(f"{self.pixels.path}: {rows} rows hold views that do not match their checksums; "
                            f"they are marked to be rendered again: run the same command again") from None
        finally:
            track.close()
        if not distributed.is_main():
            return None  # checkpoints and results are written once, by rank 0
        self.outputs = save_outputs(self.folder, weights, {**self.config, "holdout": self.holdout,
                                                           "sources": self.sources, "student_key": self.key}, log)
        (self.folder / "resume.pt").unlink(missing_ok=True)
        return {**log[-1], "seconds": round(time.time() - started, 1)}

    def _train(self, trainer, spec, cache, track: tracking.Tracker) -> tuple:
        """The training loop over replayed views at ``spec``: ({name: state}, log)."""
        c = self.config
        online = OnlineTargets(teacher_of_cache(cache.attrs)) if self.teacher_online else None
        pixel_spec = None
        if self.pixels is not None:  # the exact same pixels, rendered once (``upstream``)
            if self.pixels.spec != spec:
                raise RuntimeError(f"the pixel cache was rendered at {self.pixels.spec}, the student reads {spec}")
            dataset, pixel_spec = self.pixels.dataset(), spec
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
        return train(trainer, dataset, cache, self.index.label, self.train_rows, self.val_rows,
                     steps=c["steps"], per_domain=c["per_domain"], seed=self.seed,
                     eval_every=c["eval_every"], workers=self.workers, cutmix_p=c["cutmix"],
                     swad=self.swad, resume_path=resume,
                     resume_key=sha256_json({"config": c, "inputs": self.inputs}), online=online,
                     rank=rank, world=world, pixel_spec=pixel_spec, track=track)

    def published(self, summary: dict) -> None:
        say(f"distill: {self.method.name} held-out '{self.holdout}': best source-val accuracy "
            f"{summary['best_source_val_acc']:.3f} at step {summary['best_step']} ({summary['seconds']} s)")


class OnlineTargets:
    """The reference the cache must match: run the teacher on each replayed view, every step,
    as the official code does. Counts the teacher image forwards it spends."""

    def __init__(self, teacher):
        self.teacher, self.forwards = teacher, 0

    def __call__(self, items, teacher_pixels) -> torch.Tensor:
        self.forwards += len(items)
        return self.teacher.encode_images(teacher_pixels)


class BatchSource:
    """The one place where sampled items become ``Batch``es on the training device (as timm's
    PrefetchLoader): uint8 pixel-cache reads normalised there, or replayed views; the teacher's
    targets from the cache, or with ``online`` from the teacher itself."""

    def __init__(self, dataset, cache, labels, run_device: torch.device, *, online=None,
                 pixel_spec: InputSpec | None = None, workers: int = 0):
        self.dataset, self.cache, self.device, self.online = dataset, cache, run_device, online
        self.labels, self.pixel_spec, self.workers = torch.as_tensor(labels), pixel_spec, workers

    def batch(self, items, pixels, *teacher_pixels) -> Batch:
        if self.pixel_spec is not None:  # uint8 from the pixel cache, normalised on the training device
            images = normalise(pixels, self.pixel_spec, self.device)
        else:
            images = pixels.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        targets = self.online(items, teacher_pixels[0]) if self.online is not None else self.cache.targets(items)
        return Batch(images, self.labels[items // self.dataset.n_views].to(self.device),
                     targets.to(self.device, non_blocking=True))

    def training(self, sampler):
        """Batches for the batches of ``sampler``, read ahead."""
        pin = self.device.type == "cuda"
        if self.pixel_spec is not None:  # reads ahead in a thread: no worker processes, no copies between them
            batches = PixelBatches(self.dataset, sampler, pin_memory=pin)
        else:
            batches = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                                                  pin_memory=pin, persistent_workers=self.workers > 0)
        return (self.batch(items, *pixels) for items, *pixels in batches)

    def evaluation(self, rows):
        """Batches of the evaluation view (view 0) of ``rows``, in order."""
        eval_items = np.asarray(rows) * self.dataset.n_views
        return (self.batch(items, *pixels) for items, *pixels in loader(self.dataset, eval_items, 128, 0))


class TrainingState:
    """Everything a resume restores: the model, optimiser, schedule, random generators, the best
    model so far, the log and SWAD's bookkeeping. Saved at every validation (temp file, then rename)."""

    def __init__(self, method, model, rng: np.random.Generator, swad: SwadTracker | None, path, key: str,
                 writer: bool = True):
        self.method, self.model, self.rng, self.swad, self.path, self.key = method, model, rng, swad, path, key
        self.writer = writer  # under torchrun every rank restores and rank 0 alone saves
        self.best, self.log, self.step = (-1.0, None, 0), [], 0

    def require_space(self, folder) -> None:
        """Refuse before training when the disk cannot hold the checkpoints: at the peak, the saved
        state and its replacement (the model and two optimiser moments each, plus SWAD's average)
        beside the final weights."""
        if not self.writer:
            return
        model = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        swad = self.swad is not None
        saved_state = model * (3 + swad) if self.path is not None else 0
        space.require(folder, 2 * saved_state + model * (1 + swad), "this training (its checkpoints)")

    def restore(self) -> None:
        """Continue from the saved state, if there is one for this exact configuration."""
        if self.path is None or not Path(self.path).exists():
            return
        try:
            saved = torch.load(self.path, weights_only=True)  # tensors and plain containers only: no code runs
        except Exception as e:  # damaged: the saved progress is lost, the training itself is not
            say(f"distill: {self.path} is damaged ({str(e).splitlines()[0][:80]}); training from the start")
            return
        if saved.get("key") != self.key or ("swad" not in saved and self.swad is not None):
            return  # another configuration's state, or one saved before SWAD's state had its own key
        self.model.load_state_dict(saved["model"])
        self.method.optimizer.load_state_dict(saved["optimizer"])
        if self.method.scheduler is not None:
            self.method.scheduler.load_state_dict(saved["scheduler"])
        self.rng.bit_generator.state = saved["cutmix_rng"]
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():  # dropout, drop-path on a GPU
            torch.cuda.set_rng_state(saved["cuda_rng"])
        self.best, self.log, self.step = tuple(saved["best"]), saved["log"], saved["step"]
        if self.swad is not None:
            self.swad.load_state_dict(saved["swad"])

    def save(self, step: int) -> None:
        if self.path is None or not self.writer:
            return
        scheduler = self.method.scheduler
        state = {"key": self.key, "step": step, "model": self.model.state_dict(),
                 "optimizer": self.method.optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "cutmix_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                 "best": list(self.best), "log": self.log,
                 "swad": self.swad.state_dict() if self.swad is not None else None}
        buffer = io.BytesIO()  # serialised in memory: torch.save into a full disk fails with no errno
        torch.save(state, buffer)
        atomic.write_bytes(self.path, buffer.getvalue())


def train(method, dataset: ReplayImages, cache, labels: np.ndarray, train_rows_by_domain: list,
          val_rows_by_domain: list, *, steps: int, per_domain: int, seed: int = 0, eval_every: int = 100,
          workers: int = 0, cutmix_p: float = 0.0, cutmix_beta: float = 1.0, swad: bool = False,
          swad_valley: dict | None = None, resume_path=None, resume_key: str = "",
          online: OnlineTargets | None = None, rank: int = 0, world: int = 1,
          pixel_spec: InputSpec | None = None, track: tracking.Tracker = tracking.OFF) -> tuple[dict, list]:
    """Run ``steps`` updates of ``method``. Returns ({"best": state, ["swad": state]}, log).

    Targets come from ``cache``, or with ``online`` from the teacher itself (``dataset`` then
    also yields the teacher's preprocessing of each view).

    Under torchrun (``world`` > 1) the model is wrapped in DistributedDataParallel and each rank
    decodes and trains on its slice of every global batch; gradients are averaged, so a step is
    the single-process step on the whole batch (BatchNorm statistics stay per rank on CPU).

    With ``resume_path``, training state is saved there at every validation and, if a saved
    state with the same ``resume_key`` exists, training continues from it. ``track`` gets every
    step's loss (and its terms), learning rate and images/s, every validation and SWAD's events.
    """
    torch.manual_seed(seed)
    run_device = device()
    model = _placed(method, run_device, world)
    rng = np.random.default_rng([seed, 1])
    tracker = SwadTracker(**(swad_valley or {})) if swad else None
    state = TrainingState(method, model, rng, tracker, resume_path, resume_key, writer=rank == 0)
    if resume_path is not None:
        state.require_space(Path(resume_path).parent)
    state.restore()
    first_step = state.step
    source = BatchSource(dataset, cache, labels, run_device, online=online, pixel_spec=pixel_spec, workers=workers)
    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, dataset.n_views, seed, steps, first_step,
                                  rank=rank, world=world)
    kept = f"the last good state is kept in {resume_path}" if resume_path else "nothing was saved"
    losses, started, train_seconds = [], time.time(), 0.0
    with progress(total=steps, initial=first_step, desc=f"distill {method.name}", unit="step") as bar, \
            StopFlag() as stop:
        step_started = time.perf_counter()
        for step, batch in enumerate(source.training(sampler), start=first_step + 1):
            if cutmix_p and rng.random() < cutmix_p:
                mixed, perm, mix = cutmix(batch.images, rng, cutmix_beta)
                batch = Batch(mixed, batch.labels, batch.image_emb, batch.labels[perm], batch.image_emb[perm], mix)
            lr = method.optimizer.param_groups[0]["lr"]  # this step's (the scheduler steps after it)
            values = _global_mean(method.update(batch), world)
            losses.append(values["loss"])
            require_finite(losses[-1], step, kept)
            if tracker is not None:
                tracker.add(model.state_dict())
            bar.update(1)
            seconds = time.perf_counter() - step_started
            train_seconds += seconds
            track_step(track, step, values, lr, len(batch.labels) * world / seconds)
            if step % eval_every == 0 or step == steps:
                acc, val_loss = validate(method, source, val_rows_by_domain)
                state.log.append({"step": step, "loss": round(float(np.mean(losses)), 5), "source_val_acc": acc,
                                  "source_val_loss": round(val_loss, 5), "seconds": round(time.time() - started, 1)})
                losses = []
                bar.set_postfix(loss=state.log[-1]["loss"], val=f"{acc:.3f}")
                track.scalar("val/source_acc", acc, step)
                track.scalar("val/source_loss", val_loss, step)
                if acc > state.best[0]:
                    state.best = (acc, copy.deepcopy(model.state_dict()), step)
                if tracker is not None and tracker.validated(step, val_loss, track):
                    break
                track.flush()  # what the saved state covers is logged: a resume continues from there
                state.save(step)
                if stop.requested:
                    raise Interrupted(f"distill: interrupted at step {step} of {steps}; the state is saved, "
                                      f"run the same command again to continue")
            step_started = time.perf_counter()
    return _final_weights(method, model, source, val_rows_by_domain, state, tracker, online,
                          train_seconds / max(state.log[-1]["step"] - first_step, 1), track)


def _placed(method, run_device: torch.device, world: int) -> torch.nn.Module:
    """The method's model on the training device (channels-last on CUDA; DDP under torchrun)."""
    model = method.model.to(run_device)
    if run_device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if world > 1:
        if run_device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method.ddp = torch.nn.parallel.DistributedDataParallel(model)
    return model


def validate(method, source: BatchSource, val_rows_by_domain: list) -> tuple[float, float]:
    """Source-validation accuracy and loss: each the mean over the source domains."""
    correct, domain_losses = [], []
    for rows in val_rows_by_domain:
        hits, total_loss = [], 0.0
        for batch in source.evaluation(rows):
            logits, loss = method.score(batch)
            hits.append((logits.argmax(-1) == batch.labels).cpu().numpy())
            total_loss += loss * len(batch.labels)
        correct.append(np.concatenate(hits))
        domain_losses.append(total_loss / len(rows))
    return source_val_accuracy(correct), float(np.mean(domain_losses))


def _final_weights(method, model, source, val_rows_by_domain, state: TrainingState, tracker, online,
                   seconds_per_step: float, track: tracking.Tracker) -> tuple[dict, list]:
    """The best weights (and SWAD's average, scored on source validation) and the log with its summary."""
    states = {"best": state.best[1]}
    summary = {"best_step": state.best[2], "best_source_val_acc": state.best[0],
               "teacher_image_forwards": online.forwards if online is not None else 0,
               "train_seconds_per_step": round(seconds_per_step, 5)}
    if tracker is not None:
        # No BatchNorm re-estimation, as the official code with frozen BatchNorm
        model.load_state_dict(tracker.final_state())
        states["swad"] = copy.deepcopy(model.state_dict())
        acc, _ = validate(method, source, val_rows_by_domain)
        summary.update(tracker.summary(acc, state.log[-1]["step"]))
        track.scalar("val/swad_source_acc", acc, state.log[-1]["step"])
    return states, state.log + [summary]


def _global_mean(values: dict, world: int) -> dict:
    """The loss (and its terms) of the whole global batch: the mean of the ranks' local means (equal slices)."""
    if world == 1:
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return dict(zip(values, (total / world).tolist()))
