"""Losses and the classifier rule, as pure functions of tensors."""
import torch
import torch.nn.functional as F

LOGIT_SCALE = 100.0


def vl2v_loss(z: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
              lam: float = 0.5) -> torch.Tensor:
    """VL2V-ADiP alignment/distillation loss.

    ``L = lam * (-mean cos(z, v)) + (1 - lam) * (-mean cos(z, t_y))`` where ``z`` [B, D] is the
    projected student feature (need not be normalised), ``v`` [B, D] the teacher's image
    embedding of the same view and ``t_y`` [B, D] the teacher's text embedding of the true class.
    """
    z = F.normalize(z.float(), dim=-1)
    image_term = -(z * F.normalize(image_emb.float(), dim=-1)).sum(dim=-1).mean()
    text_term = -(z * F.normalize(text_emb.float(), dim=-1)).sum(dim=-1).mean()
    return lam * image_term + (1 - lam) * text_term


def clip_logits(z: torch.Tensor, classifier: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """``scale * cos(z, t_c)`` for every class c: [B, D] x [C, D] -> [B, C]."""
    return scale * F.normalize(z.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T
