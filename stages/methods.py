"""Distillation methods: each a small class with ``update`` (one training step) and ``predict``.

To add a method, write a class with the same three members (``model``, ``update``,
``predict``) and register it in ``METHODS``.
"""
import torch
from torch import nn

from stages.losses import clip_logits, vl2v_loss


class ProjectedStudent(nn.Module):
    """Student backbone -> linear projection into the teacher's space; classifies with text."""

    def __init__(self, backbone: nn.Module, student_dim: int, classifier: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.projection = nn.Linear(student_dim, classifier.shape[1])
        self.register_buffer("classifier", classifier.float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(images))

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``100 * cos(P(f(x)), t_c)`` over classes."""
        return clip_logits(self(images), self.classifier)


class ADiP:
    """VL2V-ADiP distill stage: the backbone learns through the frozen aligned projection.

    The loss pulls the projected student feature toward the cached teacher image embedding
    of the same view (weight ``lam``) and toward the text embedding of the true class.
    """

    def __init__(self, model: ProjectedStudent, lr: float = 5e-5, weight_decay: float = 0.0,
                 lam: float = 0.5):
        self.model, self.lam = model, lam
        model.projection.requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.backbone.parameters(), lr=lr, weight_decay=weight_decay)

    def update(self, images: torch.Tensor, labels: torch.Tensor, image_emb: torch.Tensor) -> dict:
        self.model.train()
        loss = vl2v_loss(self.model(images), image_emb, self.model.classifier[labels], self.lam)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model.predict(images)


METHODS = {"adip": ADiP}
