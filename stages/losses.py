"""Losses and the classifier rule, as pure functions of tensors.

CutMix enters every loss the same way: ``mix`` is the weight of the first image of each pair
(1 - the pasted area fraction) and ``*_b`` are the second image's targets; ``mix=1`` is no mixing.
"""
import torch
import torch.nn.functional as F

from cache.teacher_cache import LOGIT_SCALE



def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


def mixed_target(image_emb: torch.Tensor, image_emb_b: torch.Tensor | None = None, mix: float = 1.0) -> torch.Tensor:
    """The teacher's embedding of the student's view, up to its norm: ``v`` itself, or with
    CutMix ``mix * normalise(v_a) + (1 - mix) * normalise(v_b)`` (the teacher never saw the mixed image)."""
    if image_emb_b is None:
        return image_emb
    return mix * F.normalize(image_emb.float(), dim=-1) + (1 - mix) * F.normalize(image_emb_b.float(), dim=-1)


def vl2v_loss(z: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor, lam: float = 0.5,
              image_emb_b: torch.Tensor | None = None, text_emb_b: torch.Tensor | None = None,
              mix: float = 1.0) -> torch.Tensor:
    """VL2V-ADiP / VL2V-SD loss.

    ``L = lam * (-mean cos(z, v)) + (1 - lam) * (-mean cos(z, t_y))`` where ``z`` [B, D] is the
    student's (projected) feature, need not be normalised; ``v`` [B, D] the teacher's image
    embedding of the same view; ``t_y`` [B, D] the text embedding of the true class.
    With CutMix, ``v`` becomes ``normalise(mix * v_a + (1 - mix) * v_b)`` and the text term is
    area-weighted: ``mix * cos(z, t_a) + (1 - mix) * cos(z, t_b)``.
    """
    return sum(vl2v_terms(z, image_emb, text_emb, lam, image_emb_b, text_emb_b, mix).values())


def vl2v_terms(z: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor, lam: float = 0.5,
               image_emb_b: torch.Tensor | None = None, text_emb_b: torch.Tensor | None = None,
               mix: float = 1.0) -> dict:
    """``vl2v_loss`` as its two weighted terms, in the order they add up: ``image`` and ``text``."""
    image_emb = mixed_target(image_emb, image_emb_b, mix)
    text_cos = _cos(z, text_emb)
    if text_emb_b is not None:
        text_cos = mix * text_cos + (1 - mix) * _cos(z, text_emb_b)
    return {"image": lam * -_cos(z, image_emb).mean(), "text": (1 - lam) * -text_cos.mean()}


def clip_logits(z: torch.Tensor, classifier: torch.Tensor, scale: float = LOGIT_SCALE,
                bias: float = 0.0) -> torch.Tensor:
    """``scale * cos(z, t_c) + bias`` for every class c: [B, D] x [C, D] -> [B, C]. The scale and
    bias are the teacher's (``TextTargets.logit_scale``, ``logit_bias``); an OpenAI CLIP's are 100, 0."""
    return scale * F.normalize(z.float(), dim=-1) @ F.normalize(classifier.float(), dim=-1).T + bias


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, labels_b: torch.Tensor | None = None,
                  mix: float = 1.0) -> torch.Tensor:
    """Cross-entropy; with CutMix ``mix * CE(y_a) + (1 - mix) * CE(y_b)`` (the CutMix paper)."""
    loss = F.cross_entropy(logits.float(), labels)
    if labels_b is not None:
        loss = mix * loss + (1 - mix) * F.cross_entropy(logits.float(), labels_b)
    return loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            teacher_logits_b: torch.Tensor | None = None, mix: float = 1.0) -> torch.Tensor:
    """Hinton distillation ``T^2 * KL(softmax(z_T / T) || softmax(z_S / T))``, batch mean.

    With CutMix the teacher distribution is ``mix * p_a + (1 - mix) * p_b``.
    """
    t = temperature
    teacher = F.softmax(teacher_logits.float() / t, dim=-1)
    if teacher_logits_b is not None:
        teacher = mix * teacher + (1 - mix) * F.softmax(teacher_logits_b.float() / t, dim=-1)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_student, teacher, reduction="batchmean")


def rise_absolute_distance(s: torch.Tensor, class_text: torch.Tensor) -> torch.Tensor:
    """RISE AD: per-sample ``1 - cos(s, e_y)`` with ``e_y`` the class text ensemble. [B]."""
    return 1 - _cos(s, class_text)


def rise_relative_distance(s: torch.Tensor, class_text: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """RISE RD: per-sample ``10 * mean_j (softmax_j cos(s, a_j) - softmax_j cos(e_y, a_j))^2``. [B].

    ``anchors`` [B, A, D] are the text embeddings of "a {d} of a {class y}" for each anchor d:
    the student must sit among the anchors the way the class text does.
    """
    anchors = F.normalize(anchors.float(), dim=-1)
    student = F.softmax(torch.einsum("bd,bad->ba", F.normalize(s.float(), dim=-1), anchors), dim=-1)
    text = F.softmax(torch.einsum("bd,bad->ba", F.normalize(class_text.float(), dim=-1), anchors), dim=-1)
    return 10 * ((student - text) ** 2).mean(dim=-1)


def mixed_mean(per_sample_a: torch.Tensor, per_sample_b: torch.Tensor | None, mix: float) -> torch.Tensor:
    """``mean(a)`` or, with CutMix, ``mix * mean(a) + (1 - mix) * mean(b)``."""
    if per_sample_b is None:
        return per_sample_a.mean()
    return mix * per_sample_a.mean() + (1 - mix) * per_sample_b.mean()


def feature_distillation(z: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """CLIP-KD FD: ``mean((normalise(z) - normalise(v))^2)`` over every element of [B, D] (the
    official ``F.mse_loss`` of the normalised projected student feature and the teacher embedding)."""
    return F.mse_loss(F.normalize(z.float(), dim=-1), F.normalize(image_emb.float(), dim=-1))


def interactive_contrastive(z: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP-KD ICL with the teacher's image embeddings as the contrastive set: InfoNCE
    ``-mean_i log softmax_j(scale * cos(z_i, v_j))[i]``, each student feature's positive being the
    teacher's embedding of its own view and the rest of the batch its negatives."""
    logits = scale * F.normalize(z.float(), dim=-1) @ F.normalize(image_emb.float(), dim=-1).T
    return F.cross_entropy(logits, torch.arange(len(z), device=z.device))


def affinity_mimicking(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """TinyCLIP affinity mimicking from [B, C] image-to-text logits (``scale * cos``, texts as
    columns): ``0.5 * KL`` of each image's distribution over the texts (rows) plus ``0.5 * KL`` of
    each text's distribution over the batch's images (columns), teacher to student, temperature 1."""
    return 0.5 * kd_loss(student_logits, teacher_logits, 1.0) + 0.5 * kd_loss(student_logits.T, teacher_logits.T, 1.0)
