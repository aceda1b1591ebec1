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


def align(features: torch.Tensor, teacher_emb: torch.Tensor, classifier: torch.Tensor,
          labels: torch.Tensor, train_rows_by_domain: list, val_rows: np.ndarray, *,
          steps: int, per_domain: int = 32, lr: float = 5e-5, weight_decay: float = 0.0,
          lam: float = 0.5, seed: int = 0, eval_every: int = 50) -> tuple[dict, list]:
    """Train ``Linear(student_dim, teacher_dim)`` on cached arrays; keep the best on source val.

    ``features`` [N, K, d] and ``teacher_emb`` [N, K, D] are indexed by flat items
    ``row * K + view``. Returns the best projection's state dict and the training log.
    """
    torch.manual_seed(seed)
    n_views = features.shape[1]
    flat_features, flat_teacher = features.flatten(0, 1).float(), teacher_emb.flatten(0, 1).float()
    projection = torch.nn.Linear(features.shape[-1], teacher_emb.shape[-1])
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = BalancedViewSampler(train_rows_by_domain, per_domain, n_views, seed, steps)
    val_features, val_labels = features[torch.as_tensor(val_rows), 0].float(), labels[torch.as_tensor(val_rows)]

    def val_accuracy() -> float:
        with torch.no_grad():
            predicted = clip_logits(projection(val_features), classifier).argmax(-1)
        return float((predicted == val_labels).float().mean())

    best = (-1.0, None, -1)
    log = []
    for step, items in enumerate(progress(iterable=sampler, desc="align", unit="step")):
        items = torch.as_tensor(items)
        rows = items // n_views
        loss = vl2v_loss(projection(flat_features[items]), flat_teacher[items], classifier[labels[rows]], lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = val_accuracy()
            log.append({"step": step + 1, "loss": round(loss.item(), 5), "source_val_acc": acc})
            if acc > best[0]:
                best = (acc, copy.deepcopy(projection.state_dict()), step + 1)
    return best[1], log + [{"best_step": best[2], "best_source_val_acc": best[0]}]
