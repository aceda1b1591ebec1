"""The linear probe: a linear classifier on cached teacher image embeddings.

The teacher's own reference for the student, from the cache alone, in seconds.
"""
import torch
import torch.nn.functional as F

from stages.align import fit_on_cache


def train_probe(image_emb: torch.Tensor, labels: torch.Tensor, train_rows_by_domain: list, val_rows, *,
                steps: int, per_domain: int, lr: float = 1e-3, seed: int = 0, eval_every: int = 50):
    """Fit ``Linear(D, C)`` on normalised embeddings of the training views; best on source val."""
    torch.manual_seed(seed)
    features = F.normalize(image_emb.float(), dim=-1)
    head = torch.nn.Linear(features.shape[-1], int(labels.max()) + 1)
    return fit_on_cache(head, features, train_rows_by_domain, val_rows,
                        loss=lambda out, rows, items: F.cross_entropy(out, labels[rows]),
                        logits=lambda out: out, labels=labels, steps=steps, per_domain=per_domain,
                        lr=lr, weight_decay=0.0, seed=seed, eval_every=eval_every, desc="probe")


def probe_logits(head_state: dict, image_emb: torch.Tensor) -> torch.Tensor:
    weight, bias = head_state["weight"], head_state["bias"]
    return F.normalize(image_emb.float(), dim=-1) @ weight.T + bias
