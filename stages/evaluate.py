"""Evaluate: per-domain accuracy of a trained model, or of the teacher from the cache.

As DomainBed: the held-out domain is scored on its large (train) split, the source domains on
their validation split. Each evaluation writes ``metrics.json`` and, once its manifest is
written, appends the same object to ``RUN/results.jsonl``.
"""
import json
import time

import numpy as np
import torch
from safetensors.torch import load_file

from cache import atomic, jsonl, space
from cache.errors import UserError
from cache.progress import say
from data.domainbed import TRAIN, VAL
from data.images import ReplayImages
from stages.methods import ScoreJob, method_named
from stages.runtime import device, loader
from stages.stage import Stage


SMALL_FILES = 64 * 1024  # a manifest, metrics.json and a results.jsonl row, with room to spare


class Evaluate(Stage):
    def __init__(self, run, method: str, holdout: str, *, student: str | None = None, seed: int = 0,
                 model: str = "best", workers: int = 0, variant: str | None = None):
        self.method = method_named(method)
        if model not in self.method.models(swad=True):
            raise UserError(f"--model must be one of {', '.join(self.method.models(swad=True))} for {method}, "
                            f"got '{model}'")
        self.run, self.holdout, self.seed, self.model, self.workers = run, holdout, seed, model, workers
        self.index = run.load_index()
        self.index.check_holdout(holdout)
        self.inputs = run.teachers_input()
        self.weights = None
        self.key = self.method.trained_key(run, holdout, student, seed, variant)
        if not self.method.trains:
            self.model = "cache"
        else:
            self.weights = run.distill_dir(self.method.name, self.key, holdout, seed, variant) / f"{model}.safetensors"
            digest = run.output_hash(self.weights)
            if digest is None:
                raise UserError(f"no trained {method} model ({model}) for held-out '{holdout}', seed {seed}; run "
                                f"`pipeline distill --run {run.root} --method {method} --holdout {holdout}` first")
            self.inputs[run.rel(self.weights)] = digest
        self.label = self.method.name + ("+swad" if model == "swad" else "")
        self.folder = run.evaluation_dir(self.label, self.key, holdout, seed, variant)
        self.config, self.outputs = {}, ["metrics.json"]

    def describe(self) -> str:
        return f"evaluate {self.label} for held-out '{self.holdout}' ({self.key}, seed {self.seed})"

    def check(self) -> None:
        space.require(self.folder, 0, "this evaluation (metrics.json, a results.jsonl row)", margin=SMALL_FILES)

    def compute(self) -> dict:
        cache, index = self.run.load_teacher(), self.index
        trained = json.loads((self.weights.parent / "config.json").read_text()) if self.weights else None
        job = ScoreJob(cache=cache, weights=load_file(self.weights) if self.weights else None, trained=trained,
                       score_images=lambda predict, spec: evaluate_student(
                           predict, ReplayImages(index.root, index.paths, cache.view_params, spec), index,
                           self.holdout, self.workers),
                       score_embeddings=lambda logits_of: evaluate_cached(logits_of, cache, index, self.holdout))
        metrics = self.method.evaluate(job)
        # the student's starting weights as loaded (e.g. a timm tag), and the hyperparameters it was
        # trained with as given (defaults omitted)
        weights_loaded = self.method.loaded_weights(trained["student"]) if trained else None
        hparams = trained["hparams"] if trained else None
        attrs = cache.attrs
        teachers = {"teachers": self.run.teacher_label} if self.run.teacher_label else {}  # not the first teacher
        result = {"method": self.method.name, "model": self.model, "student": self.key,
                  "student_weights": weights_loaded, "hparams": hparams, "teacher": attrs["teacher"],
                  "pretrained": attrs["pretrained"], **teachers, "holdout": self.holdout, "seed": self.seed, **metrics,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic.write_bytes(self.folder / "metrics.json", json.dumps(result, indent=2, allow_nan=False).encode())
        return result

    def published(self, summary: dict) -> None:
        jsonl.append(self.run.results, summary)

    def reconcile(self, summary: dict) -> None:
        """A finished evaluation whose row never reached results.jsonl (a crash in between) gets it now."""
        row = json.loads((self.folder / "metrics.json").read_text())
        if row not in jsonl.rows(self.run.results):
            jsonl.append(self.run.results, row)
            say(f"{self.describe()}: its row was missing from {self.run.results}; added from metrics.json")


def eval_rows(index, holdout: str) -> dict:
    """domain -> (split, rows) that each domain is scored on."""
    return {d: ((TRAIN, index.rows([d], TRAIN)) if d == holdout else (VAL, index.rows([d], VAL)))
            for d in index.domains}


def summarize(accuracies: dict, splits: dict, holdout: str, counts: dict) -> dict:
    empty = [d for d in accuracies if not counts[d]]
    if holdout in empty:
        raise UserError(f"held-out domain '{holdout}' has no usable images to score")
    if empty:  # an accuracy of no images is not a number: leave the domain out, and say so
        say(f"evaluate: warning: no usable images in {', '.join(empty)}; left out of the scores")
    accuracies, splits, counts = ({d: v for d, v in x.items() if d not in empty} for x in (accuracies, splits, counts))
    sources = [d for d in accuracies if d != holdout]
    if not sources:
        raise UserError("the source domains have no usable validation images to score")
    # DomainBed's training-domain validation: each source domain weighs the same
    source_val = float(np.mean([accuracies[d] for d in sources]))
    return {"holdout_acc": accuracies[holdout], "source_val_acc": source_val,
            "accuracy": accuracies, "split": splits, "images": counts}


@torch.inference_mode()
def predict_labels(predict, dataset: ReplayImages, rows, batch_size: int = 128, workers: int = 0) -> np.ndarray:
    """Predicted class of every row's evaluation view (view 0)."""
    items = np.asarray(rows) * dataset.n_views
    predictions = [predict(pixels.to(device(), non_blocking=True)).argmax(dim=-1).cpu()
                   for _, pixels in loader(dataset, items, batch_size, workers)]
    return torch.cat(predictions).numpy() if predictions else np.zeros(0, np.int64)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return float((predicted == labels).mean()) if len(labels) else float("nan")


def evaluate_student(predict, dataset, index, holdout: str, workers: int = 0) -> dict:
    accuracies, splits, counts = {}, {}, {}
    for domain, (split, rows) in eval_rows(index, holdout).items():
        accuracies[domain] = accuracy(predict_labels(predict, dataset, rows, workers=workers), index.label[rows])
        splits[domain], counts[domain] = split, len(rows)
    return summarize(accuracies, splits, holdout, counts)


def evaluate_cached(logits_of, cache, index, holdout: str) -> dict:
    """Accuracy of a classifier of cached teacher embeddings (eval view): zero-shot, probe."""
    accuracies, splits, counts = {}, {}, {}
    for domain, (split, rows) in eval_rows(index, holdout).items():
        logits = logits_of(cache.image_emb[torch.as_tensor(rows), 0].float())
        accuracies[domain] = accuracy(logits.argmax(-1).numpy(), index.label[rows])
        splits[domain], counts[domain] = split, len(rows)
    return summarize(accuracies, splits, holdout, counts)
