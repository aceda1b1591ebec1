"""Training a small module (a projection, a linear probe) on cached per-view arrays."""
import copy
import math

import numpy as np
import torch

from cache.errors import UserError
from cache.progress import progress
from data.sampling import BalancedViewSampler


def source_val_accuracy(correct_by_domain: list) -> float:
    """Model selection as DomainBed/VL2V: the mean of the per-source-domain validation accuracies
    (each domain weighs the same, whatever its size). ``correct_by_domain``: boolean arrays."""
    return float(np.mean([np.mean(correct) for correct in correct_by_domain]))


def fit_on_cache(module: torch.nn.Module, features: torch.Tensor, train_rows_by_domain: list,
                 val_rows_by_domain: list, *,
                 loss, logits, labels: torch.Tensor, steps: int, per_domain: int, lr: float,
                 weight_decay: float, seed: int, eval_every: int, desc: str) -> tuple[dict, list]:
    """Train ``module`` with Adam; keep the state with the best source-validation accuracy.

    ``features`` is [N, K, d]; each step draws balanced (image, view) items, calls
    ``loss(module(features[items]), rows, items)``; validation scores ``logits(module(x))`` on the
    eval view (view 0) of each domain's ``val_rows_by_domain``. Returns the best state dict and the log.
    """
    n_views = features.shape[1]
    flat = features.flatten(0, 1)  # a view, no copy: each batch is converted to float32 alone
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, n_views, seed, steps)
    val_rows = [torch.as_tensor(rows) for rows in val_rows_by_domain]
    best, log = (-1.0, None, 0), []
    for step, items in enumerate(progress(iterable=sampler, desc=desc, unit="step"), start=1):
        items = torch.as_tensor(items)
        batch_loss = loss(module(flat[items].float()), items // n_views, items)
        require_finite(batch_loss.item(), step, "nothing was saved")
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                predicted = [logits(module(features[rows, 0].float())).argmax(-1) for rows in val_rows]
                acc = source_val_accuracy([(p == labels[rows]).numpy() for p, rows in zip(predicted, val_rows)])
            log.append({"step": step, "loss": round(batch_loss.item(), 5), "source_val_acc": acc})
            if acc > best[0]:
                best = (acc, copy.deepcopy(module.state_dict()), step)
    return best[1], log + [{"best_step": best[2], "best_source_val_acc": best[0]}]


def require_finite(loss: float, step: int, kept: str) -> None:
    """A NaN or infinite loss only poisons the weights from here on: stop with a clear error."""
    if not math.isfinite(loss):
        raise UserError(f"the training loss became {loss} at step {step}; {kept}; "
                        f"try a smaller --lr (the finished results are untouched)")
