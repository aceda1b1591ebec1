"""Training methods: each a small class with ``update`` (one step) and ``predict``.

Every method learns from a ``Batch``: student inputs, labels and the cached teacher embedding of
each replayed view. None of them runs the teacher. To add a method, subclass ``Method``
(``build`` the student, define ``logits`` and ``loss``) and register it in ``METHODS``.
"""
from dataclasses import dataclass

import torch
from torch import nn

from cache.teacher_store import TextTargets
from stages import losses


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    image_emb: torch.Tensor           # [B, D] cached teacher embeddings of these views
    labels_b: torch.Tensor | None = None   # CutMix: the pasted image's targets ...
    image_emb_b: torch.Tensor | None = None
    mix: float = 1.0                  # ... and the unpasted area fraction


class TextHeadStudent(nn.Module):
    """Backbone -> projection into the teacher's space; classifies with the text embeddings."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, classifier: torch.Tensor):
        super().__init__()
        self.backbone, self.projection = backbone, projection
        self.register_buffer("classifier", classifier.float().clone())

    def forward(self, images):
        return self.projection(self.backbone(images))


class LinearStudent(nn.Module):
    """Backbone -> a new linear classifier."""

    def __init__(self, backbone: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(dim, n_classes)

    def forward(self, images):
        return self.head(self.backbone(images))


class RiseStudent(nn.Module):
    """Backbone -> ``Linear(d, D)`` projector -> ``Linear(D, C)`` head initialised with the class
    text ensemble. Returns (projected feature, logits)."""

    def __init__(self, backbone: nn.Module, dim: int, ensemble: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Linear(dim, ensemble.shape[1])
        self.head = nn.Linear(ensemble.shape[1], ensemble.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(ensemble.float())
            self.head.bias.zero_()

    def forward(self, images):
        s = self.projector(self.backbone(images))
        return s, self.head(s)


class Method:
    name = ""
    needs_alignment = False   # starts from `pipeline align`'s projection
    swad_default = False
    defaults = {"optimizer": "adam", "lr": 5e-5, "weight_decay": 0.0}

    def __init__(self, model: nn.Module, text: TextTargets, steps: int, **hparams):
        self.model, self.text, self.steps = model, text, steps
        self.hp = {**self.defaults, **{k: v for k, v in hparams.items() if v is not None}}
        params = [p for p in self.trainable() if p.requires_grad]
        if self.hp["optimizer"] == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.hp["lr"], momentum=0.9,
                                             weight_decay=self.hp["weight_decay"])
        else:
            self.optimizer = torch.optim.Adam(params, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])
        self.scheduler = None
        self.ddp = None  # DistributedDataParallel wrapper of ``model`` under torchrun

    @staticmethod
    def build(backbone: nn.Module, dim: int, text: TextTargets) -> nn.Module:
        raise NotImplementedError

    def trainable(self):
        return self.model.parameters()

    def logits(self, outputs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, outputs, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, images):
        module = self.ddp if (self.ddp is not None and self.model.training) else self.model
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            return module(images)

    def update(self, batch: Batch) -> dict:
        self.model.train()
        loss = self.loss(self._forward(batch.images), batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> tuple:
        """(logits, loss) without updating: for validation and the SWAD loss valley."""
        self.model.eval()
        outputs = self._forward(batch.images)
        return self.logits(outputs), self.loss(outputs, batch).item()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.logits(self._forward(images))


class ADiP(Method):
    """VL2V-ADiP distill stage: the backbone learns through the frozen aligned projection, pulled
    toward the cached image embedding of the view (``lam``) and the class text embedding."""

    name, needs_alignment, swad_default = "adip", True, True
    defaults = {**Method.defaults, "lam": 0.5}

    @staticmethod
    def build(backbone, dim, text):
        return TextHeadStudent(backbone, nn.Linear(dim, text.classifier.shape[1]), text.classifier)

    def trainable(self):
        return self.model.backbone.parameters()  # projection and text head stay frozen

    def logits(self, z):
        return losses.clip_logits(z, self.model.classifier)

    def loss(self, z, b):
        classifier = self.model.classifier
        return losses.vl2v_loss(z, b.image_emb, classifier[b.labels], self.hp["lam"], b.image_emb_b,
                                None if b.labels_b is None else classifier[b.labels_b], b.mix)


class SD(ADiP):
    """VL2V-SD: the student is the teacher's own image tower (white-box), trained end to end with
    the same loss, no extra projection."""

    name, needs_alignment = "sd", False

    @staticmethod
    def build(tower, dim, text):
        return TextHeadStudent(tower, nn.Identity(), text.classifier)


class ERM(Method):
    """Cross-entropy only, no teacher: the baseline."""

    name = "erm"

    @staticmethod
    def build(backbone, dim, text):
        return LinearStudent(backbone, dim, text.classifier.shape[0])

    def logits(self, outputs):
        return outputs

    def loss(self, logits, b):
        return losses.cross_entropy(logits, b.labels, b.labels_b, b.mix)


class KD(ERM):
    """Hinton logit distillation from the cached teacher's zero-shot logits, plus cross-entropy:
    ``alpha * KD + (1 - alpha) * CE``."""

    name = "kd"
    defaults = {**Method.defaults, "temperature": 4.0, "alpha": 0.5}

    def loss(self, logits, b):
        teacher = losses.clip_logits(b.image_emb, self.text.classifier)
        teacher_b = None if b.image_emb_b is None else losses.clip_logits(b.image_emb_b, self.text.classifier)
        kd = losses.kd_loss(logits, teacher, self.hp["temperature"], teacher_b, b.mix)
        return self.hp["alpha"] * kd + (1 - self.hp["alpha"]) * losses.cross_entropy(logits, b.labels, b.labels_b, b.mix)


class RISE(Method):
    """RISE: ``w_kd * KD + w_ce * CE + w_dist * (AD + RD)`` with teacher logits
    ``100 * cos(v, e_c)`` over the 7-template class ensemble, T = 3; SGD with step decay."""

    name = "rise"
    defaults = {"optimizer": "sgd", "lr": 1e-3, "weight_decay": 5e-4, "temperature": 3.0,
                "w_kd": 0.9, "w_ce": 0.1, "w_dist": 1.0}

    def __init__(self, model, text, steps, **hparams):
        super().__init__(model, text, steps, **hparams)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=max(1, int(0.8 * steps)), gamma=0.1)

    @staticmethod
    def build(backbone, dim, text):
        return RiseStudent(backbone, dim, text.ensemble)

    def logits(self, outputs):
        return outputs[1]

    def loss(self, outputs, b):
        s, logits = outputs
        ensemble, anchors = self.text.ensemble, self.text.anchors

        def distance(labels):
            return (losses.rise_absolute_distance(s, ensemble[labels])
                    + losses.rise_relative_distance(s, ensemble[labels], anchors[labels]))

        teacher = losses.clip_logits(b.image_emb, ensemble)
        teacher_b = None if b.image_emb_b is None else losses.clip_logits(b.image_emb_b, ensemble)
        kd = losses.kd_loss(logits, teacher, self.hp["temperature"], teacher_b, b.mix)
        ce = losses.cross_entropy(logits, b.labels, b.labels_b, b.mix)
        dist = losses.mixed_mean(distance(b.labels), None if b.labels_b is None else distance(b.labels_b), b.mix)
        return self.hp["w_kd"] * kd + self.hp["w_ce"] * ce + self.hp["w_dist"] * dist


METHODS = {m.name: m for m in (ADiP, SD, RISE, KD, ERM)}
