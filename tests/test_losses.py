import math

import pytest
import torch

from stages.losses import clip_logits, vl2v_loss


def test_vl2v_loss_hand_computed():
    z = torch.tensor([[3.0, 0.0], [0.0, 2.0]])          # unnormalised on purpose
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0]])       # cos: 1, 1/sqrt(2)
    text = torch.tensor([[0.0, 1.0], [0.0, -5.0]])       # cos: 0, -1
    lam = 0.3
    expected = lam * -(1 + 1 / math.sqrt(2)) / 2 + (1 - lam) * -(0 - 1) / 2
    assert vl2v_loss(z, image, text, lam).item() == pytest.approx(expected, abs=1e-6)


def test_vl2v_loss_extremes_and_scale_invariance():
    v = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert vl2v_loss(v * 7, v, v, 0.5).item() == pytest.approx(-1.0, abs=1e-6)
    assert vl2v_loss(-v, v, v, 0.5).item() == pytest.approx(1.0, abs=1e-6)
    z = torch.randn(5, 8)
    assert vl2v_loss(z, v, -v, 1.0).item() == pytest.approx(vl2v_loss(3 * z, v, v, 1.0).item(), abs=1e-6)
    assert vl2v_loss(z, v, -v, 0.0).item() == pytest.approx(-vl2v_loss(z, v, v, 0.0).item(), abs=1e-6)


def test_vl2v_loss_gradient_flows_to_z():
    z = torch.randn(4, 6, requires_grad=True)
    vl2v_loss(z, torch.randn(4, 6), torch.randn(4, 6)).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_clip_logits_is_100_times_cosine():
    z = torch.tensor([[2.0, 0.0]])
    classifier = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    logits = clip_logits(z, classifier)
    assert torch.allclose(logits, torch.tensor([[100.0, 0.0, 100 / math.sqrt(2)]]), atol=1e-4)
