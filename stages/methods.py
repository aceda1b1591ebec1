"""Methods: everything the pipeline knows about a method lives on its class, registered once.

A method owns its student: where it comes from (``resolve``: a timm backbone, the teacher's own
image tower, or none: the cached teacher itself), how it is built, fitted (``fit``) and evaluated
(``evaluate``), which weights it saves, what it needs first (``needs_alignment``), its
hyperparameters with their defaults (the ``pipeline distill`` options and their help text are
derived from them) and the built-in demo's overrides, and what the official online-teacher code
spends on it. ``Distill``, ``Evaluate`` and ``pipeline run`` call these and never ask what kind
of student a method has; the stage hands the method a job (``TrainJob``, ``ScoreJob``) with
what only the stage knows (the cache, the rows, how batches of views are made).

Student methods train with ``update`` (one step on a ``Batch``) and answer ``predict``; cache
methods (zero-shot, probe) work on the cached teacher embeddings alone.

To add a method: subclass ``Method`` (``build`` the student, define ``logits`` and ``loss``) and
add it to ``METHODS``. No other file names a method.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cache.errors import UserError
from cache.teacher_cache import TeacherCache, TextTargets
from stages import losses
from stages import tracking
from stages.fit import fit_on_cache, loss_values
from stages.runtime import device
from stages.student import create_backbone, feature_dim, resolved_weights, student_key
from stages.teacher import teacher_of_cache

# The student folder keys of the methods whose student is not a timm backbone.
TEACHER_TOWER = "teacher-image-tower"  # the teacher's own image tower (white-box: needs its weights)
TEACHER = "teacher"              # no student: the cached teacher embeddings themselves

# VL2V-ADiP's align stage (``pipeline align``), which every ``needs_alignment`` method starts from.
ALIGN_HPARAMS = {"lr": 5e-5, "lam": 0.5, "weight_decay": 0.0}
ALIGN_DEMO = {"lr": 1e-3}  # the built-in demo's 1000 alignment steps on cached features (not tuned)
# The demo's student learning rates (250 steps instead of 5000) are each method's ``demo``: chosen
# on source-domain validation from {5e-5, 3e-4, 1e-3, 3e-3, 1e-2}, seed 0, mean over the four
# held-out styles, a tie going to the smaller rate (the README's demo section has the numbers).

# Help text of every hyperparameter a method may declare (its default comes from the method).
HPARAM_HELP = {
    "lr": "Learning rate.",
    "weight_decay": "Weight decay.",
    "lam": "Weight of the image-embedding term (1 - lam: the text term).",
    "temperature": "Distillation temperature.",
    "alpha": "Weight of the KD term (1 - alpha: cross-entropy).",
    "w_kd": "Weight of the KD term.",
    "w_ce": "Weight of the cross-entropy term.",
    "w_dist": "Weight of the absolute + relative distance terms.",
    "w_fd": "Weight of the feature-distillation (MSE) term.",
    "w_icl": "Weight of the interactive contrastive (InfoNCE) term.",
}


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    image_emb: torch.Tensor           # [B, D] cached teacher embeddings of these views
    labels_b: torch.Tensor | None = None   # CutMix: the pasted image's targets ...
    image_emb_b: torch.Tensor | None = None
    mix: float = 1.0                  # ... and the unpasted area fraction


@dataclass
class TrainJob:
    """What a distill stage hands a method to fit: the cache, the rows, the settings, and
    ``train(trainer, spec)``, the stage's training loop over replayed views at ``spec``."""

    cache: TeacherCache
    labels: torch.Tensor
    train_rows: list
    val_rows: list
    sources: list
    student: dict             # the resolved student description (``Method.resolve``)
    config: dict              # the stage's config: steps, per_domain, seed, eval_every, ...
    hparams: dict
    projection: dict | None   # the aligned projection's weights (``needs_alignment``)
    train: object             # (trainer: Method, spec: InputSpec) -> (weights, log)
    track: tracking.Tracker = tracking.OFF  # the stage's run tracking (``--log``)


@dataclass
class ScoreJob:
    """What an evaluate stage hands a method to score: the cache, the trained weights and their
    config, and the two ways of scoring (images at a spec, or cached embeddings)."""

    cache: TeacherCache
    weights: dict | None      # the saved state dict (None: nothing was trained)
    trained: dict | None      # the distill stage's config.json
    score_images: object      # (predict: images -> logits, spec) -> metrics
    score_embeddings: object  # (logits_of: embeddings -> logits) -> metrics


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
    needs_alignment = False  # starts from `pipeline align`'s projection
    swad = False             # SWAD weight averaging by default: saves "swad" beside "best"
    in_default_run = True    # part of `pipeline run` without --methods
    per_teacher = False      # with an ensemble, `pipeline run` also scores it on each teacher alone
    trains = seeded = True   # has a distill stage; its result depends on the seed
    optimizer_kind = "adam"
    # As the official VL2V trainer (its hparams freeze_bn): BatchNorm layers stay in eval mode while
    # training, so running statistics keep their pre-trained values; their affine weights still train.
    freeze_batchnorm = True
    hparams = {"lr": 5e-5, "weight_decay": 0.0}
    demo = {}                # the built-in demo's overrides of ``hparams``

    @classmethod
    def models(cls, swad: bool | None = None) -> tuple:
        """The weights a training saves and `pipeline run` evaluates."""
        return ("best", "swad") if (cls.swad if swad is None else swad) else ("best",)

    @classmethod
    def official_teacher_forwards(cls, *, steps: int, align_steps: int, batch: int) -> int:
        """Teacher image forwards the official online-teacher code spends on one (holdout, seed):
        one per training image per step of every stage that distils."""
        return steps * batch

    # ---------------------------------------------------------------- the student, for the stages

    @classmethod
    def resolve(cls, run, holdout: str, student: str | None, student_weights: str, student_size) -> tuple:
        """(folder key, description) of the student trained for ``holdout``: a timm backbone.

        ``student``: a timm model name; for methods that start from an alignment (or when omitted),
        it picks among the students aligned for ``holdout``.
        """
        if cls.needs_alignment or student is None:
            key = run.aligned_student(holdout, student if cls.needs_alignment else None)
            return key, run.aligned_student_description(key)
        return student_key(student, student_weights, student_size), {
            "student": student, "student_weights": student_weights, "student_size": student_size,
            "resolved_weights": resolved_weights(student, student_weights)}

    @classmethod
    def trained_key(cls, run, holdout: str, student: str | None, seed: int, variant: str | None) -> str:
        """The student key of a finished training (to evaluate)."""
        return run.trained_student(cls.name, holdout, student, seed, variant)

    @classmethod
    def run_options(cls, student: dict, aligned: str | None) -> dict:
        """`pipeline run`'s student options for this method's distill stage."""
        return {**student, "student": aligned} if cls.needs_alignment else student

    @classmethod
    def schedule(cls, settings: dict, cutmix: float) -> dict:
        """`pipeline run`'s step budget and CutMix for this method."""
        return {"steps": settings["steps"], "cutmix": cutmix}

    @classmethod
    def check_settings(cls, *, per_domain: int, n_sources: int, world: int, teacher_online: bool) -> None:
        """Refuse settings this method cannot train with (before anything is recomputed)."""
        if (per_domain * n_sources) % world:
            raise UserError(f"--per-domain {per_domain} x {n_sources} source domains must split "
                            f"evenly over {world} processes")

    @classmethod
    def text_targets(cls, cache: TeacherCache, sources: list, anchors: str) -> TextTargets:
        return cache.text(sources)

    @classmethod
    def build_student(cls, student: dict, cache: TeacherCache, text: TextTargets, teacher_weights: bool):
        """The method's model (untrained head) and its input spec, from a student description."""
        backbone, spec = create_backbone(student["student"], student["student_weights"], student["student_size"])
        return cls.build(backbone, feature_dim(backbone), text), spec

    @classmethod
    def input_spec(cls, student: dict, cache_attrs: dict):
        """The input spec of the student's images (what its pixel cache is rendered at), from the
        student's description and the teacher cache's attributes (no cache rows are read)."""
        return create_backbone(student["student"], student["student_weights"], student["student_size"])[1]

    @classmethod
    def loaded_weights(cls, student: dict) -> str | None:
        """The student's starting weights, as loaded (e.g. a timm tag), for the results row."""
        return resolved_weights(student["student"], student["student_weights"])

    @classmethod
    def fit(cls, job: TrainJob) -> tuple:
        """Build the student, then train it in the stage's loop: ({name: state}, log)."""
        text = cls.text_targets(job.cache, job.sources, job.config["anchors"])
        model, spec = cls.build_student(job.student, job.cache, text, teacher_weights=True)
        if cls.needs_alignment:
            model.projection.load_state_dict(job.projection)
        # Frozen BatchNorm keeps pre-trained statistics; a random-init student has none to keep
        random_init = job.student.get("student_weights") == "none"
        trainer = cls(model, text, job.config["steps"], freeze_batchnorm=False if random_init else None, **job.hparams)
        return job.train(trainer, spec)

    @classmethod
    def evaluate(cls, job: ScoreJob) -> dict:
        """Per-domain metrics of the trained student on the evaluation views."""
        trained = job.trained
        text = cls.text_targets(job.cache, trained["sources"], trained["anchors"])
        net, spec = cls.build_student(trained["student"], job.cache, text, teacher_weights=False)
        net.load_state_dict(job.weights)
        return job.score_images(cls(net.to(device()), text, 1).predict, spec)

    # ---------------------------------------------------------------- the method itself

    def __init__(self, model: nn.Module, text: TextTargets, steps: int, freeze_batchnorm: bool | None = None,
                 **hparams):
        self.model, self.text, self.steps = model, text, steps
        if freeze_batchnorm is not None:  # e.g. off for a random-init student: no statistics to keep
            self.freeze_batchnorm = freeze_batchnorm
        self.hp = {**self.hparams, **{k: v for k, v in hparams.items() if v is not None and k in self.hparams}}
        self._optimizer = self._scheduler = None  # built on first use: predicting needs neither
        self.ddp = None  # DistributedDataParallel wrapper of ``model`` under torchrun
        self._terms = (None, {})  # (the sum, the named terms) of the last ``terms`` call

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            params = [p for p in self.trainable() if p.requires_grad]
            if self.optimizer_kind == "sgd":
                self._optimizer = torch.optim.SGD(params, lr=self.hp["lr"], momentum=0.9,
                                                  weight_decay=self.hp["weight_decay"])
            else:
                self._optimizer = torch.optim.Adam(params, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])
            self._scheduler = self.make_scheduler(self._optimizer)
        return self._optimizer

    @property
    def scheduler(self):
        self.optimizer  # built together with the optimizer
        return self._scheduler

    def make_scheduler(self, optimizer):
        return None

    @staticmethod
    def build(backbone: nn.Module, dim: int, text: TextTargets) -> nn.Module:
        raise NotImplementedError

    def trainable(self):
        return self.model.parameters()

    def logits(self, outputs) -> torch.Tensor:
        raise NotImplementedError

    def teacher_logits(self, image_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of its image embeddings: its own scale and bias."""
        return losses.clip_logits(image_emb, classifier, self.text.logit_scale, self.text.logit_bias)

    def loss(self, outputs, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def terms(self, **weighted) -> torch.Tensor:
        """A loss of named, weighted terms: their sum in order. When it is the loss ``loss``
        returns, ``update`` reports each term (for run tracking)."""
        self._terms = (sum(weighted.values()), weighted)
        return self._terms[0]

    def _forward(self, images):
        module = self.ddp if (self.ddp is not None and self.model.training) else self.model
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            return module(images)

    def update(self, batch: Batch) -> dict:
        optimizer, scheduler = self.optimizer, self.scheduler
        self.model.train()
        if self.freeze_batchnorm:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        self._terms = (None, {})  # a loss that does not call ``terms`` has none
        loss = self.loss(self._forward(batch.images), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total, terms = self._terms
        return loss_values(loss, terms if total is loss else {})

    @torch.no_grad()
    def score(self, batch: Batch) -> tuple:
        """(logits, mean cross-entropy of the logits) without updating: the validation accuracy and
        the loss the official SWAD loss valley reads (whatever loss the method trains with)."""
        self.model.eval()
        logits = self.logits(self._forward(batch.images))
        return logits, F.cross_entropy(logits.float(), batch.labels).item()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.logits(self._forward(images))


class ADiP(Method):
    """VL2V-ADiP distill stage: the backbone learns through the frozen aligned projection, pulled
    toward the cached image embedding of the view (``lam``) and the class text embedding."""

    name, needs_alignment, swad = "adip", True, True
    hparams = {**Method.hparams, "lam": 0.5}
    demo = {"lr": 3e-3}  # source val 85.8 / 91.4 / 92.5 / 96.1 / 66.9% at 5e-5 ... 1e-2

    @classmethod
    def official_teacher_forwards(cls, *, steps, align_steps, batch):
        return (align_steps + steps) * batch  # the teacher runs in the align stage too

    @staticmethod
    def build(backbone, dim, text):
        return TextHeadStudent(backbone, nn.Linear(dim, text.classifier.shape[1]), text.classifier)

    def trainable(self):
        return self.model.backbone.parameters()  # projection and text head stay frozen

    def logits(self, z):
        return losses.clip_logits(z, self.model.classifier, self.text.logit_scale, self.text.logit_bias)

    def loss(self, z, b):
        classifier = self.model.classifier
        return self.terms(**losses.vl2v_terms(z, b.image_emb, classifier[b.labels], self.hp["lam"],
                                              b.image_emb_b, None if b.labels_b is None else classifier[b.labels_b],
                                              b.mix))


class FixedStudent:
    """A student the user does not choose (``fixed_key``): one folder key, no student options."""

    fixed_key = ""

    @classmethod
    def resolve(cls, run, holdout, student, student_weights, student_size):
        return cls.fixed_key, {"student": cls.fixed_key}

    @classmethod
    def trained_key(cls, run, holdout, student, seed, variant):
        return cls.fixed_key

    @classmethod
    def run_options(cls, student, aligned):
        return {}


class SD(FixedStudent, ADiP):
    """VL2V-SD: the student is the teacher's own image tower (white-box), trained end to end with
    the same loss, no extra projection."""

    name, needs_alignment, in_default_run = "sd", False, False
    fixed_key = TEACHER_TOWER
    demo = {"lr": 3e-4}  # not tuned

    @classmethod
    def official_teacher_forwards(cls, *, steps, align_steps, batch):
        return steps * batch

    @classmethod
    def build_student(cls, student, cache, text, teacher_weights):
        teacher = teacher_of_cache(cache.attrs, weights=teacher_weights)
        return cls.build(teacher.model.visual.float(), cache.dim, text), teacher.input_spec

    @classmethod
    def input_spec(cls, student, cache_attrs):
        return teacher_of_cache(cache_attrs, weights=False).input_spec

    @classmethod
    def loaded_weights(cls, student):
        return None  # the teacher's own weights, recorded with the cache

    @staticmethod
    def build(tower, dim, text):
        return TextHeadStudent(tower, nn.Identity(), text.classifier)


class ERM(Method):
    """Cross-entropy only, no teacher: the baseline."""

    name = "erm"
    demo = {"lr": 1e-3}  # source val 74.4 / 91.4 / 94.4 / 93.3 / 50.6% at 5e-5 / 3e-4 / 1e-3 / 3e-3 / 1e-2

    @classmethod
    def official_teacher_forwards(cls, *, steps, align_steps, batch):
        return 0

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
    hparams = {**Method.hparams, "temperature": 4.0, "alpha": 0.5}
    demo = {"lr": 1e-3}  # source val 73.1 / 89.2 / 93.3 / 92.8 / 63.9% at 5e-5 ... 1e-2

    @classmethod
    def official_teacher_forwards(cls, *, steps, align_steps, batch):
        return steps * batch

    def loss(self, logits, b):
        teacher = self.teacher_logits(b.image_emb, self.text.classifier)
        teacher_b = None if b.image_emb_b is None else self.teacher_logits(b.image_emb_b, self.text.classifier)
        kd = losses.kd_loss(logits, teacher, self.hp["temperature"], teacher_b, b.mix)
        return self.terms(kd=self.hp["alpha"] * kd,
                          ce=(1 - self.hp["alpha"]) * losses.cross_entropy(logits, b.labels, b.labels_b, b.mix))


class RISE(Method):
    """RISE: ``w_kd * KD + w_ce * CE + w_dist * (AD + RD)`` with teacher logits
    ``logit_scale * cos(v, e_c)`` (the teacher's: 100 for OpenAI CLIP, the official constant) over the
    7-template class ensemble, T = 3; SGD with step decay."""

    name, optimizer_kind = "rise", "sgd"
    freeze_batchnorm = False  # RISE's trainer puts the whole student in train mode every epoch
    hparams = {"lr": 1e-3, "weight_decay": 5e-4, "temperature": 3.0, "w_kd": 0.9, "w_ce": 0.1, "w_dist": 1.0}
    demo = {"lr": 1e-3}  # source val 77.5 / 90.3 / 94.7 / 94.7 / 93.6% at 5e-5 ... 1e-2

    ANCHORS = ("domains", "generic")  # the source-domain names, or the generic photo anchors

    @classmethod
    def text_targets(cls, cache, sources, anchors):
        """RISE's relative-distance anchors: the source-domain names, or the generic photo anchors."""
        if anchors not in cls.ANCHORS:
            raise UserError(f"--anchors must be one of {', '.join(cls.ANCHORS)}, got '{anchors}'")
        return cache.text(sources if anchors == "domains" else cache.generic_anchors())

    def make_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, int(0.8 * self.steps)), gamma=0.1)

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

        teacher = self.teacher_logits(b.image_emb, ensemble)
        teacher_b = None if b.image_emb_b is None else self.teacher_logits(b.image_emb_b, ensemble)
        kd = losses.kd_loss(logits, teacher, self.hp["temperature"], teacher_b, b.mix)
        ce = losses.cross_entropy(logits, b.labels, b.labels_b, b.mix)
        dist = losses.mixed_mean(distance(b.labels), None if b.labels_b is None else distance(b.labels_b), b.mix)
        return self.terms(kd=self.hp["w_kd"] * kd, ce=self.hp["w_ce"] * ce, dist=self.hp["w_dist"] * dist)


class TeacherSpace(Method):
    """A student as CLIP-KD's and TinyCLIP's: the backbone and a new projection into the teacher's
    space (``Linear(d, D)``), trained together; it classifies with the class text classifier."""

    in_default_run = False
    whole_batch = False  # the loss relates every image to the whole batch

    @classmethod
    def check_settings(cls, *, per_domain, n_sources, world, teacher_online):
        super().check_settings(per_domain=per_domain, n_sources=n_sources, world=world, teacher_online=teacher_online)
        if cls.whole_batch and world > 1:  # each process would only see its slice of the batch
            raise UserError(f"{cls.name} relates every image to the whole batch, which torchrun splits "
                            f"over processes: run it in one process")

    @staticmethod
    def build(backbone, dim, text):
        return TextHeadStudent(backbone, nn.Linear(dim, text.classifier.shape[1]), text.classifier)

    def logits(self, z):
        return losses.clip_logits(z, self.model.classifier, self.text.logit_scale, self.text.logit_bias)

    def task_loss(self, z, b):
        """The CLIP task loss with class texts for captions: cross-entropy over the class texts."""
        return losses.cross_entropy(self.logits(z), b.labels, b.labels_b, b.mix)


class FD(TeacherSpace):
    """CLIP-KD feature distillation: the task loss plus ``w_fd`` x the MSE between the normalised
    projected feature and the teacher's embedding of the view."""

    name = "fd"
    hparams = {**Method.hparams, "w_fd": 2000.0}

    def loss(self, z, b):
        target = losses.mixed_target(b.image_emb, b.image_emb_b, b.mix)
        return self.task_loss(z, b) + self.hp["w_fd"] * losses.feature_distillation(z, target)


class ContrastiveStudent(TextHeadStudent):
    """``TextHeadStudent`` with ICL's learnable contrastive scale, as the official code initialised
    at ln(1 / 0.07) and used as the multiplier itself (not exponentiated)."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, classifier: torch.Tensor):
        super().__init__(backbone, projection, classifier)
        self.contrast_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


class ICL(TeacherSpace):
    """CLIP-KD interactive contrastive learning: the task loss plus ``w_icl`` x InfoNCE of each
    projected feature against the teacher's embeddings of the batch's views."""

    name, whole_batch = "icl", True
    hparams = {**Method.hparams, "w_icl": 1.0}

    @staticmethod
    def build(backbone, dim, text):
        return ContrastiveStudent(backbone, nn.Linear(dim, text.classifier.shape[1]), text.classifier)

    def loss(self, z, b):
        target = losses.mixed_target(b.image_emb, b.image_emb_b, b.mix)
        icl = losses.interactive_contrastive(z, target, self.model.contrast_scale)
        return self.task_loss(z, b) + self.hp["w_icl"] * icl


class Affinity(TeacherSpace):
    """TinyCLIP affinity mimicking with the class texts for captions: the student's image-to-text
    and text-to-image affinities (over the class texts, over the batch's images) pulled to the
    teacher's by KL, at the logit scale; no task loss, as TinyCLIP's default."""

    name, whole_batch = "affinity", True

    def loss(self, z, b):
        target = losses.mixed_target(b.image_emb, b.image_emb_b, b.mix)
        return losses.affinity_mimicking(self.logits(z), self.logits(target))


class CacheMethod(FixedStudent):
    """A method of the cached teacher embeddings alone: no student, no images, no teacher."""

    name, fixed_key = "", TEACHER
    needs_alignment = swad = False
    in_default_run = per_teacher = True
    trains = True   # fits something on the cache (with the alignment step budget)
    seeded = True
    hparams = {}
    demo = {}
    models = Method.models

    @classmethod
    def official_teacher_forwards(cls, *, steps, align_steps, batch):
        return 0

    @classmethod
    def schedule(cls, settings, cutmix):
        return {"steps": settings["align_steps"], "cutmix": 0.0}  # a linear problem on the cache, like align

    @classmethod
    def check_settings(cls, *, per_domain, n_sources, world, teacher_online):
        if teacher_online:
            raise UserError(f"--teacher-online applies to student methods, not {cls.name}")

    @classmethod
    def fit(cls, job: TrainJob) -> tuple:
        c = job.config
        state, log = cls.fit_head(job.cache.image_emb, job.labels, job.train_rows, job.val_rows, steps=c["steps"],
                                  per_domain=c["per_domain"], seed=c["seed"], eval_every=c["eval_every"],
                                  track=job.track, **job.hparams)
        return {"best": state}, log

    @classmethod
    def evaluate(cls, job: ScoreJob) -> dict:
        return job.score_embeddings(cls.logits_of(job.weights, job.cache))

    @classmethod
    def input_spec(cls, student, cache_attrs):
        return None  # no images: nothing to render

    @classmethod
    def loaded_weights(cls, student):
        return None  # no student

    @classmethod
    def logits_of(cls, weights: dict | None, cache):
        """emb [N, D] -> logits [N, C]."""
        raise NotImplementedError


class ZeroShot(CacheMethod):
    """The teacher itself: ``logit_scale * cos(v, t_c) + logit_bias`` (the teacher's own; 100 and 0
    for OpenAI CLIP) on the cached eval view and text classifier."""

    name, trains, seeded = "zeroshot", False, False

    @classmethod
    def logits_of(cls, weights, cache):
        return lambda emb: losses.clip_logits(emb, cache.classifier, cache.logit_scale, cache.logit_bias)


class Probe(CacheMethod):
    """A linear classifier on the cached teacher image embeddings (normalised), Adam, seconds."""

    name = "probe"
    hparams = {"lr": 1e-3}

    @classmethod
    def fit_head(cls, image_emb: torch.Tensor, labels: torch.Tensor, train_rows_by_domain: list, val_rows_by_domain: list, *,
            steps: int, per_domain: int, seed: int, eval_every: int, track: tracking.Tracker = tracking.OFF,
            **hparams):
        """Fit ``Linear(D, C)`` on the training views; the best on source validation."""
        hp = {**cls.hparams, **{k: v for k, v in hparams.items() if v is not None and k in cls.hparams}}
        torch.manual_seed(seed)
        features = F.normalize(image_emb.float(), dim=-1)
        head = torch.nn.Linear(features.shape[-1], int(labels.max()) + 1)
        return fit_on_cache(head, features, train_rows_by_domain, val_rows_by_domain,
                            loss=lambda out, rows, items: F.cross_entropy(out, labels[rows]),
                            logits=lambda out: out, labels=labels, steps=steps, per_domain=per_domain,
                            lr=hp["lr"], weight_decay=0.0, seed=seed, eval_every=eval_every, desc=cls.name,
                            track=track)

    @classmethod
    def logits_of(cls, weights, cache):
        return lambda emb: F.normalize(emb.float(), dim=-1) @ weights["weight"].T + weights["bias"]


METHODS = {m.name: m for m in (ZeroShot, Probe, ERM, KD, RISE, ADiP, SD, FD, ICL, Affinity)}
DEFAULT_METHOD = ADiP.name
BENCH_METHOD = KD.name  # the one `pipeline bench` times: it reads the teacher targets every step


def method_named(name: str):
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def all_hparams() -> dict:
    """name -> {method: default} over every method, in first-declared order (for the CLI)."""
    table = {}
    for method in METHODS.values():
        for key, default in method.hparams.items():
            table.setdefault(key, {})[method.name] = default
    return table
