"""Align: fit the linear projection from frozen student features to the teacher's space.

Two stages. ``StudentFeatures`` embeds every recorded view once with the frozen (eval-mode)
student into ``features.h5`` (``cache/student_features.py``), shared by every held-out domain;
``Align`` then trains the projection on those cached arrays with the VL2V loss, so each
alignment is a small linear problem that runs in seconds.
"""
import json
import time

import numpy as np
import torch

from cache import atomic, store, student_features
from cache.teacher_cache import TeacherCache
from cache.progress import progress, say
from data.pixels import RenderedRows, normalise
from stages.fit import fit_on_cache
from stages.losses import clip_logits, vl2v_terms
from stages.methods import ALIGN_HPARAMS
from stages.runtime import device, loader
from stages import stage, tracking
from stages.stage import Stage, require_positive, require_rates, save_outputs
from stages.student import create_backbone, resolved_weights, student_key


class StudentFeatures(Stage):
    """The frozen student's features of every view of every image (once per student)."""

    def __init__(self, run, *, student: str, student_weights: str, student_size, batch_size: int = 128,
                 workers: int = 0):
        self.run, self.batch_size, self.workers = run, batch_size, workers
        self.key = student_key(student, student_weights, student_size)
        self.folder = run.features_dir(self.key)
        self.config = {"student": student, "student_weights": student_weights, "student_size": student_size,
                       "resolved_weights": resolved_weights(student, student_weights)}
        self.inputs = run.teacher_cache_input()
        self.outputs = [student_features.FILE, "student.json"]
        self.repairing = []  # damaged blocks of features.h5, found by why_stale

    @property
    def path(self):
        return self.folder / student_features.FILE

    def describe(self) -> str:
        return f"student features ({self.key})"

    def why_stale(self) -> str | None:
        """Also stale when features.h5 is damaged; then only its damaged blocks are recomputed."""
        why, self.repairing = super().why_stale(), []
        if why is None:
            self.repairing = student_features.damaged_rows(self.path)
            return f"{student_features.FILE} is damaged" if self.repairing else None
        return why

    @torch.inference_mode()
    def compute(self) -> dict:
        index = self.run.load_index()
        c = self.config
        backbone, spec = create_backbone(c["student"], c["student_weights"], c["student_size"])
        view_params = store.read(self.run.teacher_cache, "view_params")
        n_views = view_params.shape[1]
        rows = np.asarray(index.rows())
        features = None
        if self.repairing and not self.force:
            features = store.read(self.path, "features")
            for block in self.repairing:
                features[block.start:block.stop] = 0
            rows = rows[np.isin(rows, np.concatenate([np.arange(b.start, b.stop) for b in self.repairing]))]
            say(f"align: {len(self.repairing)} damaged blocks of {self.path}: recomputing {len(rows)} images")
        else:
            say(f"align: caching frozen {c['student']} features of {len(rows)} images x {n_views} views")
        dataset = RenderedRows(index.root, index.paths, view_params, spec)  # one decode per image
        backbone = backbone.eval().to(device())
        started = time.time()
        with progress(total=len(rows) * n_views, desc="student features", unit="view") as bar:
            # --batch-size counts views: whole images of K views each
            for batch_rows, views in loader(dataset, rows, max(1, self.batch_size // n_views), self.workers):
                pixels = normalise(views.flatten(0, 1), spec, device())
                out = backbone(pixels).float().cpu().numpy().reshape(len(batch_rows), n_views, -1)
                if features is None:
                    features = np.zeros((len(index), n_views, out.shape[-1]), np.float16)
                features[batch_rows.numpy()] = out
                bar.update(out.shape[0] * n_views)
        if self.repairing and not self.force:
            student_features.repair(self.path, features, self.repairing)
        else:
            student_features.write(self.path, features, {**c, "input_spec": spec.to_dict()})
        atomic.write_bytes(self.folder / "student.json", json.dumps(
            {**c, "input_spec": spec.to_dict(), "dim": int(features.shape[-1])}, indent=2).encode())
        return {"views": len(rows) * n_views, "seconds": round(time.time() - started, 2), "dim": int(features.shape[-1])}


class Align(Stage):
    """The projection ``Linear(student_dim, teacher_dim)`` for one held-out domain."""

    def __init__(self, run, features: StudentFeatures, holdout: str, *, steps: int, per_domain: int,
                 lr: float = ALIGN_HPARAMS["lr"], lam: float = ALIGN_HPARAMS["lam"], seed: int = 0,
                 eval_every: int = 100, log: str = tracking.DEFAULT):
        require_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
        require_rates({"lr": lr, "lam": lam})
        self.log_to = log  # not in the config: tracking never changes what the stage computes
        self.run, self.features, self.holdout, self.key = run, features, holdout, features.key
        self.sources, self.train_rows, self.val_rows = run.load_index().sources(holdout)
        self.folder = run.align_dir(self.key, holdout)
        self.config = {"steps": steps, "per_domain": per_domain, "lr": lr, "lam": lam, "seed": seed,
                       "eval_every": eval_every, "weight_decay": ALIGN_HPARAMS["weight_decay"]}
        self.outputs = ["projection.safetensors", "config.json", "log.jsonl"]

    @property
    def inputs(self) -> dict:  # read when the features stage has finished
        return {**self.run.teacher_cache_input(), self.run.rel(self.features.path): self.run.output_hash(self.features.path)}

    def describe(self) -> str:
        return f"align for held-out '{self.holdout}' ({self.key})"

    def compute(self) -> dict:
        cache = TeacherCache(self.run.teacher_cache)
        labels = torch.as_tensor(self.run.load_index().label)
        started = time.time()
        track = tracking.start(self.log_to, self.run, self.folder, self.config)
        try:
            state, log = align(student_features.read(self.features.path), cache.image_emb, cache.classifier,
                               labels, self.train_rows, self.val_rows, **self.config, track=track)
        finally:
            track.close()
        save_outputs(self.folder, {"projection": state},
                     {**self.config, "holdout": self.holdout, "sources": self.sources, "student_key": self.key}, log)
        return {**log[-1], "seconds": round(time.time() - started, 2)}

    def published(self, summary: dict) -> None:
        say(f"align: held-out '{self.holdout}': best source-val accuracy {summary['best_source_val_acc']:.3f} "
            f"at step {summary['best_step']} ({summary['seconds']} s)")


def run_alignment(run, *, student: str, student_weights: str, student_size, holdout: str, batch_size: int = 128,
                  workers: int = 0, force: bool = False, **settings) -> str:
    """The student's features (once per student), then the alignment for ``holdout``; the student key."""
    features = StudentFeatures(run, student=student, student_weights=student_weights, student_size=student_size,
                               batch_size=batch_size, workers=workers)
    alignment = Align(run, features, holdout, **settings)  # checks the settings before any work
    stage.run(features, force, quiet=True)
    stage.run(alignment, force)
    return features.key


def align(features: torch.Tensor, teacher_emb: torch.Tensor, classifier: torch.Tensor,
          labels: torch.Tensor, train_rows_by_domain: list, val_rows_by_domain: list, *,
          steps: int, per_domain: int = 32, lr: float = 5e-5, weight_decay: float = 0.0,
          lam: float = 0.5, seed: int = 0, eval_every: int = 50,
          track: tracking.Tracker = tracking.OFF) -> tuple[dict, list]:
    """Train ``Linear(student_dim, teacher_dim)`` with the VL2V loss on cached arrays.

    ``features`` [N, K, d] and ``teacher_emb`` [N, K, D] are indexed by flat items
    ``row * K + view``. Returns the best projection's state dict and the training log.
    """
    torch.manual_seed(seed)
    flat_teacher = teacher_emb.flatten(0, 1)  # a view, no copy: each batch is converted alone
    projection = torch.nn.Linear(features.shape[-1], teacher_emb.shape[-1])
    return fit_on_cache(
        projection, features, train_rows_by_domain, val_rows_by_domain,
        loss=lambda z, rows, items: vl2v_terms(z, flat_teacher[items].float(), classifier[labels[rows]], lam),
        logits=lambda z: clip_logits(z, classifier), labels=labels, steps=steps, per_domain=per_domain,
        lr=lr, weight_decay=weight_decay, seed=seed, eval_every=eval_every, desc="align", track=track)
