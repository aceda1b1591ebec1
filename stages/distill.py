"""Distill: train the student on replayed views against cached teacher targets.

No teacher in the loop: each step decodes the recorded views (in DataLoader workers), runs
the student forward and backward, and reads the teacher's embeddings of those exact views
from memory. The model with the best source-validation accuracy is kept (DomainBed's
training-domain validation).
"""
import copy
import time

import numpy as np
import torch

from data.images import ReplayImages
from data.sampling import BalancedViewSampler
from pipeline.progress import progress
from stages.predict import accuracy, device, predict_labels


def distill(method, dataset: ReplayImages, cache, labels: np.ndarray, train_rows_by_domain: list,
            val_rows: np.ndarray, *, steps: int, per_domain: int, seed: int = 0,
            eval_every: int = 100, workers: int = 0) -> tuple[dict, list]:
    """Run ``steps`` updates of ``method``; return the best state dict and the log."""
    torch.manual_seed(seed)
    run_device = device()
    method.model.to(run_device)
    labels_t = torch.as_tensor(labels)
    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, dataset.n_views, seed, steps)
    batches = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                          pin_memory=torch.cuda.is_available(),
                                          persistent_workers=workers > 0)

    def source_val_accuracy() -> float:
        predicted = predict_labels(method.predict, dataset, val_rows, workers=0)
        return accuracy(predicted, labels[val_rows])

    best, log, losses = (-1.0, None, 0), [], []
    started = time.time()
    with progress(total=steps, desc="distill", unit="step") as bar:
        for step, (items, pixels) in enumerate(batches, start=1):
            targets = cache.targets(items).to(run_device, non_blocking=True)
            step_labels = labels_t[items // dataset.n_views].to(run_device, non_blocking=True)
            losses.append(method.update(pixels.to(run_device, non_blocking=True), step_labels, targets)["loss"])
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                acc = source_val_accuracy()
                log.append({"step": step, "loss": round(float(np.mean(losses)), 5),
                            "source_val_acc": acc, "seconds": round(time.time() - started, 1)})
                losses = []
                bar.set_postfix(loss=log[-1]["loss"], val=f"{acc:.3f}")
                if acc > best[0]:
                    best = (acc, copy.deepcopy(method.model.state_dict()), step)
    return best[1], log + [{"best_step": best[2], "best_source_val_acc": best[0]}]
