"""Align: fit the linear projection from frozen student features to the teacher's space.

The frozen student's features of every recorded view are computed once (``features.h5``,
[images, views, student_dim] float16) and reused for every held-out domain, so each alignment
is a small linear problem on cached arrays that runs in seconds.
"""
import copy
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from cache import store
from data.images import ReplayImages
from data.sampling import BalancedViewSampler
from pipeline.progress import progress
from stages.losses import clip_logits, vl2v_loss
from stages.predict import device, loader


@torch.inference_mode()
def cache_student_features(backbone, spec, index, view_params: np.ndarray, rows, features_path,
                           batch_size: int = 128, workers: int = 0, attrs: dict | None = None) -> dict:
    """Frozen (eval-mode) student features of every view of ``rows`` into ``features_path``."""
    features_path = Path(features_path)
    n_views = view_params.shape[1]
    dataset = ReplayImages(index.root, index.paths, view_params, spec)
    backbone = backbone.eval().to(device())
    items = (np.asarray(rows)[:, None] * n_views + np.arange(n_views)).ravel()
    batches = loader(dataset, items, batch_size, workers)
    features = None
    started = time.time()
    with progress(total=len(items), desc="student features", unit="view") as bar:
        for batch_items, pixels in batches:
            out = backbone(pixels.to(device(), non_blocking=True)).float().cpu().numpy()
            if features is None:
                features = np.zeros((len(index), n_views, out.shape[1]), np.float16)
            features.reshape(-1, out.shape[1])[batch_items.numpy()] = out
            bar.update(len(batch_items))
    tmp = features_path.with_name(features_path.name + ".partial")
    store.create(tmp, {"features": (features.shape, np.float16)}, attrs or {})
    with h5py.File(tmp, "r+") as f:
        f["features"][...] = features
    tmp.replace(features_path)
    return {"views": len(items), "seconds": round(time.time() - started, 2), "dim": features.shape[-1]}


def fit_on_cache(module: torch.nn.Module, features: torch.Tensor, train_rows_by_domain: list, val_rows, *,
                 loss, logits, labels: torch.Tensor, steps: int, per_domain: int, lr: float,
                 weight_decay: float, seed: int, eval_every: int, desc: str) -> tuple[dict, list]:
    """Train a small module on cached per-view arrays with Adam; keep the best on source val.

    ``features`` is [N, K, d]; each step draws balanced (image, view) items, calls
    ``loss(module(features[items]), rows, items)``; validation scores ``logits(module(x))`` on the
    eval view (view 0) of ``val_rows``. Returns the best state dict and the log.
    """
    n_views = features.shape[1]
    flat = features.flatten(0, 1).float()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, n_views, seed, steps)
    val_rows = torch.as_tensor(val_rows)
    val_inputs, val_labels = features[val_rows, 0].float(), labels[val_rows]
    best, log = (-1.0, None, 0), []
    for step, items in enumerate(progress(iterable=sampler, desc=desc, unit="step"), start=1):
        items = torch.as_tensor(items)
        batch_loss = loss(module(flat[items]), items // n_views, items)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                acc = float((logits(module(val_inputs)).argmax(-1) == val_labels).float().mean())
            log.append({"step": step, "loss": round(batch_loss.item(), 5), "source_val_acc": acc})
            if acc > best[0]:
                best = (acc, copy.deepcopy(module.state_dict()), step)
    return best[1], log + [{"best_step": best[2], "best_source_val_acc": best[0]}]


def align(features: torch.Tensor, teacher_emb: torch.Tensor, classifier: torch.Tensor,
          labels: torch.Tensor, train_rows_by_domain: list, val_rows: np.ndarray, *,
          steps: int, per_domain: int = 32, lr: float = 5e-5, weight_decay: float = 0.0,
          lam: float = 0.5, seed: int = 0, eval_every: int = 50) -> tuple[dict, list]:
    """Train ``Linear(student_dim, teacher_dim)`` with the VL2V loss on cached arrays.

    ``features`` [N, K, d] and ``teacher_emb`` [N, K, D] are indexed by flat items
    ``row * K + view``. Returns the best projection's state dict and the training log.
    """
    torch.manual_seed(seed)
    flat_teacher = teacher_emb.flatten(0, 1).float()
    projection = torch.nn.Linear(features.shape[-1], teacher_emb.shape[-1])
    return fit_on_cache(
        projection, features, train_rows_by_domain, val_rows,
        loss=lambda z, rows, items: vl2v_loss(z, flat_teacher[items], classifier[labels[rows]], lam),
        logits=lambda z: clip_logits(z, classifier), labels=labels, steps=steps, per_domain=per_domain,
        lr=lr, weight_decay=weight_decay, seed=seed, eval_every=eval_every, desc="align")
