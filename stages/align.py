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
from cache.progress import progress, say
from data.pixels import RenderedRows, normalise
from stages.fit import fit_on_cache
from stages.losses import clip_logits, vl2v_terms
from stages.methods import ALIGN_HPARAMS
from stages.runtime import batched, device
from stages import stage, tracking
from stages.stage import Stage, require_positive, require_rates, save_outputs
from stages.student import create_backbone, feature_dim, resolved_weights, student_key


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

    @property
    def path(self):
        return self.folder / student_features.FILE

    def describe(self) -> str:
        return f"student features ({self.key})"

    def why_stale(self) -> str | None:
        """Also stale while features.h5 has blocks to compute: unfinished, or marked by a reader that
        found them damaged (checked from the checksum table alone: the rows are checked where read)."""
        why = super().why_stale()
        if why is None and student_features.pending(self.path):
            return f"{student_features.FILE} has blocks to compute"
        return why

    @torch.inference_mode()
    def compute(self) -> dict:
        """Block by block into features.h5: one block of rows in memory, resumable after a kill."""
        index = self.run.load_index()
        c = self.config
        backbone, spec = create_backbone(c["student"], c["student_weights"], c["student_size"])
        view_params = store.read(self.run.teacher_cache, "view_params")
        n_views, dim = view_params.shape[1], feature_dim(backbone)
        self.folder.mkdir(parents=True, exist_ok=True)
        blocks = student_features.prepare(self.path, len(index), n_views, dim, {**c, "input_spec": spec.to_dict()},
                                          force=self.force)
        ok = np.zeros(len(index), bool)
        ok[index.rows()] = True
        work = [np.arange(b.start, b.stop)[ok[b.start:b.stop]] for b in blocks]
        n_images = int(sum(map(len, work)))
        say(f"align: caching frozen {c['student']} features of {n_images} images x {n_views} views"
            + (f" ({len(blocks)} blocks of {self.path.name} to compute)" if n_images < ok.sum() else ""))
        per_batch = max(1, self.batch_size // n_views)  # --batch-size counts views: whole images of K views
        batches = [rows[i:i + per_batch].tolist() for rows in work for i in range(0, len(rows), per_batch)]
        results = iter(batched(RenderedRows(index.root, index.paths, view_params, spec), batches, self.workers))
        backbone = backbone.eval().to(device())
        started = time.time()
        with store.Rows(self.path) as out, progress(total=n_images * n_views, desc="student features", unit="view") as bar:
            for block, rows in zip(blocks, work):
                features, done = np.zeros((len(block), n_views, dim), np.float16), 0
                while done < len(rows):
                    batch_rows, views = next(results)
                    pixels = normalise(views.flatten(0, 1), spec, device())
                    features[batch_rows.numpy() - block.start] = \
                        backbone(pixels).float().cpu().numpy().reshape(len(batch_rows), n_views, dim)
                    done += len(batch_rows)
                    bar.update(len(batch_rows) * n_views)
                student_features.write_block(out, block, features)
        atomic.write_bytes(self.folder / "student.json", json.dumps(
            {**c, "input_spec": spec.to_dict(), "dim": dim}, indent=2).encode())
        return {"views": n_images * n_views, "seconds": round(time.time() - started, 2), "dim": dim}


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
        return {**self.run.teachers_input(), self.run.rel(self.features.path): self.run.output_hash(self.features.path)}

    def describe(self) -> str:
        return f"align for held-out '{self.holdout}' ({self.key})"

    def compute(self) -> dict:
        cache = self.run.load_teacher()
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
    try:
        stage.run(alignment, force)
    except student_features.DamagedFeatures as e:  # its damaged blocks are marked: recompute just them
        say(f"align: {e}; recomputing them")
        stage.run(features, False, quiet=True)
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
