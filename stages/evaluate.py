"""Evaluate: per-domain accuracy of a trained student, or of the teacher from the cache.

As DomainBed: the held-out domain is scored on its large (train) split, the source domains on
their validation split.
"""
import numpy as np
import torch

from data.domainbed import TRAIN, VAL
from stages.predict import accuracy, predict_labels


def eval_rows(index, holdout: str) -> dict:
    """domain -> (split, rows) that each domain is scored on."""
    return {d: ((TRAIN, index.rows([d], TRAIN)) if d == holdout else (VAL, index.rows([d], VAL)))
            for d in index.domains}


def summarize(accuracies: dict, splits: dict, holdout: str, counts: dict) -> dict:
    sources = [d for d in accuracies if d != holdout]
    source_val = float(np.average([accuracies[d] for d in sources], weights=[counts[d] for d in sources])) \
        if sum(counts[d] for d in sources) else float("nan")
    return {"holdout_acc": accuracies[holdout], "source_val_acc": source_val,
            "accuracy": accuracies, "split": splits, "images": counts}


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
