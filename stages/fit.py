"""Training a small module (a projection, a linear probe) on cached per-view arrays."""
import copy
import math
import time

import numpy as np
import torch

from cache.errors import UserError
from cache.progress import progress
from data.sampling import BalancedViewSampler
from stages import tracking


def source_val_accuracy(correct_by_domain: list) -> float:
    """Model selection as DomainBed/VL2V: the mean of the per-source-domain validation accuracies
    (each domain weighs the same, whatever its size). ``correct_by_domain``: boolean arrays."""
    return float(np.mean([np.mean(correct) for correct in correct_by_domain]))


def fit_on_cache(module: torch.nn.Module, features: torch.Tensor, train_rows_by_domain: list,
                 val_rows_by_domain: list, *,
                 loss, logits, labels: torch.Tensor, steps: int, per_domain: int, lr: float,
                 weight_decay: float, seed: int, eval_every: int, desc: str,
                 track: tracking.Tracker = tracking.OFF) -> tuple[dict, list]:
    """Train ``module`` with Adam; keep the state with the best source-validation accuracy.

    ``features`` is [N, K, d]; each step draws balanced (image, view) items and minimises
    ``loss(module(features[items]), rows, items)``: a tensor, or a dict of named weighted terms
    (their sum; each term is tracked). Validation scores ``logits(module(x))`` on the eval view
    (view 0) of each domain's ``val_rows_by_domain``. Returns the best state dict and the log.
    """
    n_views = features.shape[1]
    flat = features.flatten(0, 1)  # a view, no copy: each batch is converted to float32 alone
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, n_views, seed, steps)
    val_rows = [torch.as_tensor(rows) for rows in val_rows_by_domain]
    best, log = (-1.0, None, 0), []
    step_started = time.perf_counter()
    for step, items in enumerate(progress(iterable=sampler, desc=desc, unit="step"), start=1):
        items = torch.as_tensor(items)
        terms = loss(module(flat[items].float()), items // n_views, items)
        terms = terms if isinstance(terms, dict) else {"loss": terms}
        batch_loss = sum(terms.values())
        values = loss_values(batch_loss, terms)
        require_finite(values["loss"], step, "nothing was saved")
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        track_step(track, step, values, lr, len(items) / (time.perf_counter() - step_started))
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                predicted = [logits(module(features[rows, 0].float())).argmax(-1) for rows in val_rows]
                acc = source_val_accuracy([(p == labels[rows]).numpy() for p, rows in zip(predicted, val_rows)])
            log.append({"step": step, "loss": round(values["loss"], 5), "source_val_acc": acc})
            track.scalar("val/source_acc", acc, step)
            if acc > best[0]:
                best = (acc, copy.deepcopy(module.state_dict()), step)
        step_started = time.perf_counter()
    return best[1], log + [{"best_step": best[2], "best_source_val_acc": best[0]}]


def loss_values(total: torch.Tensor, terms: dict) -> dict:
    """A step's loss as numbers: ``loss``, and each named term when there are several."""
    return {"loss": total.item(), **({name: term.item() for name, term in terms.items()} if len(terms) > 1 else {})}


def track_step(track: tracking.Tracker, step: int, values: dict, lr: float, images_per_s: float) -> None:
    """One training step's scalars: the loss and its terms (``loss_values``), the learning rate and
    the images per second (for a fit on cached arrays: views)."""
    for name, value in values.items():
        track.scalar("train/loss" if name == "loss" else f"train/loss/{name}", value, step)
    track.scalar("train/lr", lr, step)
    track.scalar("train/images_per_s", images_per_s, step)


def require_finite(loss: float, step: int, kept: str) -> None:
    """A NaN or infinite loss only poisons the weights from here on: stop with a clear error."""
    if not math.isfinite(loss):
        raise UserError(f"the training loss became {loss} at step {step}; {kept}; "
                        f"try a smaller --lr (the finished results are untouched)")
