"""fd, icl and affinity: each loss against the official formula written out here, what trains and
what stays frozen, CutMix, and each method through `pipeline distill` and `pipeline evaluate`.

The official formulas, restated (winycg/CLIP-KD ``src/open_clip/loss.py`` KDClipLoss; microsoft/Cream
TinyCLIP ``src/open_clip/clip_soft_loss.py`` ClipSoftLoss):
- FD: ``F.mse_loss(normalize(visual_proj(s)), t)``, the teacher's embedding ``t`` L2-normalised;
- ICL: ``F.cross_entropy(cross_logit_scale * normalize(s) @ t.T, arange(B))``, the scale a
  parameter initialised at ln(1 / 0.07) and not exponentiated;
- TinyCLIP: ``(CE(s_i2t, softmax(t_i2t)) + CE(s_t2i, softmax(t_t2i))) / 2`` with soft targets, both
  sides ``scale * cos``; here the KL, which differs from it by the teacher's entropy only.
"""
import json
import math

import numpy as np
import pytest
import torch

from cache.errors import UserError
from stages import losses
from stages.methods import FD, ICL, Affinity, ContrastiveStudent, TextHeadStudent
from tests.conftest import DISTILL, invoke
from tests.test_training_math import CLASSIFIER, make, np_ce, np_cos, np_log_softmax, np_softmax, snapshot, t, \
    tiny_batch

NEW = [FD, ICL, Affinity]


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_fd(z, v):
    """Mean over all B x D elements of (z / |z| - v / |v|)^2."""
    return ((unit(z) - unit(v)) ** 2).mean()


def np_icl(z, v, scale):
    """-1/B sum_i log( exp(s cos(z_i, v_i)) / sum_j exp(s cos(z_i, v_j)) )."""
    logits = scale * unit(z) @ unit(v).T
    return -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(len(z))])


def np_soft_ce(student_logits, teacher_logits):
    """TinyCLIP's single_loss_fn: mean over rows of -sum_c softmax(teacher)_c log softmax(student)_c."""
    return -(np_softmax(teacher_logits) * np_log_softmax(student_logits)).sum(-1).mean()


def np_entropy(logits):
    p = np_softmax(logits)
    return -(p * np.log(p)).sum(-1).mean()


def np_tinyclip(z, v, texts, scale=100.0):
    """The official two-way soft cross-entropy, minus the teacher's entropies (constants)."""
    s, te = scale * unit(z) @ unit(texts).T, scale * unit(v) @ unit(texts).T   # [B, C] image-to-text
    official = (np_soft_ce(s, te) + np_soft_ce(s.T, te.T)) / 2
    return official - (np_entropy(te) + np_entropy(te.T)) / 2


Z = [[1.0, 2.0], [-1.0, 0.5], [0.3, 0.3], [2.0, -0.5]]
V = [[0.5, 0.1], [0.2, -1.0], [1.0, 1.0], [-0.3, 0.4]]


# --------------------------------------------------------------------------- the pure losses
def test_feature_distillation_is_the_mse_of_normalised_embeddings():
    assert losses.feature_distillation(t(Z), t(V)).item() == pytest.approx(np_fd(Z, V), abs=1e-6)
    # hand value: z along v gives 0; orthogonal unit vectors give (1 + 1) / 2 per element pair
    assert losses.feature_distillation(t([[3.0, 0.0]]), t([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.feature_distillation(t([[0.0, 5.0]]), t([[2.0, 0.0]])).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("scale", [math.log(1 / 0.07), 10.0])
def test_interactive_contrastive_is_infonce_over_the_teacher_batch(scale):
    got = losses.interactive_contrastive(t(Z), t(V), torch.tensor(scale)).item()
    assert got == pytest.approx(np_icl(Z, V, scale), rel=1e-5)


def test_interactive_contrastive_positive_is_the_own_view():
    v = np.eye(4)
    aligned = losses.interactive_contrastive(t(v.tolist()), t(v.tolist()), torch.tensor(2.0)).item()
    shifted = losses.interactive_contrastive(t(np.roll(v, 1, axis=0).tolist()), t(v.tolist()), torch.tensor(2.0))
    assert aligned == pytest.approx(math.log(1 + 3 * math.exp(-2)), rel=1e-5)
    assert shifted.item() == pytest.approx(math.log(math.exp(2) + 3), rel=1e-5)  # matched to another view


def test_affinity_mimicking_equals_tinyclip_up_to_the_teacher_entropy():
    texts = np.array(CLASSIFIER)
    student, teacher = (losses.clip_logits(t(x), t(CLASSIFIER)) for x in (Z, V))
    assert losses.affinity_mimicking(student, teacher).item() == pytest.approx(np_tinyclip(Z, V, texts), rel=1e-4)
    assert losses.affinity_mimicking(teacher, teacher).item() == pytest.approx(0.0, abs=1e-5)


def test_affinity_mimicking_has_the_official_soft_cross_entropy_gradient():
    z = torch.tensor(Z, requires_grad=True)
    texts = torch.nn.functional.normalize(t(CLASSIFIER), dim=-1)
    teacher = 100 * torch.nn.functional.normalize(t(V), dim=-1) @ texts.T

    def soft_ce(s, te):  # TinyCLIP's single_loss_fn
        return torch.nn.functional.cross_entropy(s, torch.softmax(te, -1))

    student = 100 * torch.nn.functional.normalize(z, dim=-1) @ texts.T
    official = (soft_ce(student, teacher) + soft_ce(student.T, teacher.T)) / 2
    (g_official,) = torch.autograd.grad(official, z)
    (g_ours,) = torch.autograd.grad(losses.affinity_mimicking(losses.clip_logits(z, t(CLASSIFIER)), teacher), z)
    assert torch.allclose(g_ours, g_official, atol=1e-5)


# --------------------------------------------------------------------------- the methods' losses
@pytest.mark.parametrize("use_cutmix", [False, True])
@pytest.mark.parametrize("cls", NEW)
def test_method_loss_hand_computed(cls, use_cutmix):
    method = make(cls)
    b = tiny_batch(use_cutmix)
    cls_ = np.array(CLASSIFIER)
    logits = np.array([[100 * np_cos(z, c) for c in cls_] for z in Z])
    ce = np_ce(logits, b.labels.tolist())
    target = b.image_emb.double().numpy()
    if use_cutmix:  # the teacher's embedding of the mixed view: the area-weighted mean direction
        target = b.mix * unit(target) + (1 - b.mix) * unit(b.image_emb_b.double().numpy())
        ce = b.mix * ce + (1 - b.mix) * np_ce(logits, b.labels_b.tolist())
    expected = {FD: lambda: ce + 2000 * np_fd(Z, target),
                ICL: lambda: ce + 1.0 * np_icl(Z, target, math.log(1 / 0.07)),
                Affinity: lambda: np_tinyclip(Z, target, cls_)}[cls]()
    assert method.loss(t(Z), b).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("cls", NEW)
def test_backbone_and_projection_train_texts_and_targets_stay(cls):
    method = make(cls, lr=1e-2)
    assert isinstance(method.model, ContrastiveStudent if cls is ICL else TextHeadStudent)
    before, batch = snapshot(method.model), tiny_batch()
    emb = batch.image_emb.clone()
    for _ in range(2):
        method.update(batch)
    after = method.model.state_dict()
    trained = {"backbone.weight", "backbone.bias", "projection.weight", "projection.bias"}
    if cls is ICL:
        trained.add("contrast_scale")
        assert before["contrast_scale"].item() == pytest.approx(math.log(1 / 0.07))
    for k in after:
        assert torch.equal(before[k], after[k]) == (k not in trained), k
    assert torch.equal(method.model.classifier, t(CLASSIFIER))
    assert torch.equal(batch.image_emb, emb)
    optimised = {id(p) for g in method.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in method.model.parameters()}


@pytest.mark.parametrize("cls", NEW)
def test_predicts_with_the_class_text_classifier(cls):
    method = make(cls)
    x = torch.ones(1, 4)
    z = method.model.projection(method.model.backbone(x)).detach().double().numpy()[0]
    assert method.predict(x)[0].tolist() == pytest.approx([100 * np_cos(z, c) for c in CLASSIFIER], abs=1e-3)


@pytest.mark.parametrize("cls", [ICL, Affinity])
def test_whole_batch_losses_refuse_torchrun(cls):
    cls.check_settings(per_domain=2, n_sources=3, world=1, teacher_online=False)
    with pytest.raises(UserError, match="whole batch"):
        cls.check_settings(per_domain=2, n_sources=3, world=2, teacher_online=False)
    FD.check_settings(per_domain=2, n_sources=3, world=2, teacher_online=False)


# --------------------------------------------------------------------------- through the pipeline
@pytest.mark.parametrize("method", ["fd", "icl", "affinity"])
def test_distill_and_evaluate(method, run_copy):
    student = ("--student", "test_resnet", "--student-weights", "none", "--student-size", 32)
    result = invoke("distill", "--run", run_copy, "--method", method, "--holdout", "sketch", *student, *DISTILL,
                    "--cutmix", 1.0)
    assert result.exit_code == 0, result.output
    folder = run_copy / "distill" / method / "test_resnet_none_32px" / "sketch" / "seed0"
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in log if "loss" in row)
    result = invoke("evaluate", "--run", run_copy, "--method", method, "--holdout", "sketch", "--workers", 0)
    assert result.exit_code == 0, result.output
    record = json.loads((run_copy / "results.jsonl").read_text().splitlines()[-1])
    assert record["method"] == method and record["model"] == "best"
    assert set(record["accuracy"]) == {"cartoon", "photo", "pixel", "sketch"}


def test_hyperparameters_are_options():
    help_text = invoke("distill", "--help").output
    assert "--w-fd" in help_text and "--w-icl" in help_text
