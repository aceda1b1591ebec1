"""Hand-computed checks of the training maths: losses, CutMix, SWAD and the method classes.

Every expected value here is computed by hand (plain ``math``/``numpy`` in float64, or written
out as numbers), never by calling the code under test a second way. CPU only, no network.
"""
import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from cache.teacher_cache import TextTargets
from data.cutmix import cutmix, rand_bbox
from stages import losses
from stages.methods import ADiP, ERM, KD, RISE, SD, Batch
from stages.swad import LossValley, RunningAverage, Segment


# --------------------------------------------------------------------------- hand-written maths
def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def np_kd(student_logits, teacher_probs, t):
    """t^2 * sum_b KL(p_b || softmax(z_b / t)) / B, written out."""
    log_q = np_log_softmax(np.asarray(student_logits, dtype=np.float64) / t)
    p = np.asarray(teacher_probs, dtype=np.float64)
    return t * t * (p * (np.log(p) - log_q)).sum() / p.shape[0]


def np_ce(logits, labels):
    ls = np_log_softmax(logits)
    return -np.mean([ls[i, y] for i, y in enumerate(labels)])


def np_rd(s, e, anchors):
    """RISE relative distance of one sample, 10 * mean_j (softmax cos(s,a) - softmax cos(e,a))^2."""
    ps = np_softmax([np_cos(s, a) for a in anchors])
    pe = np_softmax([np_cos(e, a) for a in anchors])
    return 10 * np.mean((ps - pe) ** 2)


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# ============================================================================ stages/losses.py
def test_kd_loss_hand_computed_2x3_temperature_2():
    zs = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
    zt = [[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    T = 2.0
    # row 0: teacher softmax([1.5, .5, 0]), student softmax([.5, 1, 1.5]); row 1: uniform teacher
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        et = [math.exp(v / T) for v in t_row]
        p = [v / sum(et) for v in et]
        es = [math.exp(v / T) for v in s_row]
        q = [v / sum(es) for v in es]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected = T * T * total / 2  # batchmean: sum over the batch / B
    got = losses.kd_loss(t(zs), t(zt), T).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected > 0.1  # a real, non-trivial value


def test_kd_loss_zero_when_student_equals_teacher():
    z = t([[1.0, -2.0, 0.5], [3.0, 3.0, -1.0]])
    assert losses.kd_loss(z, z.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_cutmix_mixes_teacher_probabilities():
    zs = [[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]]
    za = [[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]
    zb = [[0.0, 0.0, 4.0], [1.0, 2.0, 0.0]]
    T, mix = 2.0, 0.3
    p = mix * np_softmax(np.array(za) / T) + (1 - mix) * np_softmax(np.array(zb) / T)
    expected = np_kd(zs, p, T)
    got = losses.kd_loss(t(zs), t(za), T, teacher_logits_b=t(zb), mix=mix).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # mixing probabilities, not logits: the logit mix gives a different number here
    p_logit_mix = np_softmax((mix * np.array(za) + (1 - mix) * np.array(zb)) / T)
    assert abs(np_kd(zs, p_logit_mix, T) - expected) > 1e-2


def test_cross_entropy_cutmix_hand_computed():
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    ya, yb, mix = [0, 2], [1, 1], 0.25

    def ce(labels):
        total = 0.0
        for row, y in zip(logits, labels):
            lse = math.log(sum(math.exp(v) for v in row))
            total += -(row[y] - lse)
        return total / len(logits)

    expected = mix * ce(ya) + (1 - mix) * ce(yb)
    got = losses.cross_entropy(t(logits), torch.tensor(ya), torch.tensor(yb), mix).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert losses.cross_entropy(t(logits), torch.tensor(ya)).item() == pytest.approx(ce(ya), rel=1e-6)


def test_rise_absolute_distance_per_sample():
    s = t([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    e = t([[1.0, 0.0], [0.0, 5.0], [0.0, -1.0]])
    expected = [1 - 1.0, 1 - 1 / math.sqrt(2), 1 - (-1.0)]
    got = losses.rise_absolute_distance(s, e)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_rise_relative_distance_hand_computed():
    s = [1.0, 0.0]
    e = [0.0, 1.0]
    anchors = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # first one unnormalised on purpose
    r = 1 / math.sqrt(2)
    cs, ce_ = [1.0, 0.0, r], [0.0, 1.0, r]  # cos(s, a_j), cos(e_y, a_j)
    ps = [math.exp(c) / sum(math.exp(x) for x in cs) for c in cs]
    pe = [math.exp(c) / sum(math.exp(x) for x in ce_) for c in ce_]
    expected0 = 10 * sum((a - b) ** 2 for a, b in zip(ps, pe)) / 3
    # second sample: s parallel to e_y -> 0
    got = losses.rise_relative_distance(t([s, [0.0, 2.5]]), t([e, [0.0, 1.0]]), t([anchors, anchors]))
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(expected0, rel=1e-5)
    assert expected0 > 0.05
    assert got[1].item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("scale", [0.01, 1.0, 37.0])
def test_rise_relative_distance_zero_when_parallel(scale):
    e = t([[0.3, -0.4, 1.2], [1.0, 2.0, 0.5]])
    anchors = t([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[0.2, 0.1, 0.0], [-1.0, 0.0, 3.0]]])
    got = losses.rise_relative_distance(scale * e, e, anchors)
    assert got.abs().max().item() < 1e-6


def test_vl2v_loss_cutmix_hand_computed():
    z = [[1.0, 1.0], [2.0, -1.0]]
    va = [[2.0, 0.0], [0.0, 1.0]]   # normalised: [1, 0], [0, 1]
    vb = [[0.0, 3.0], [4.0, 3.0]]   # normalised: [0, 1], [.8, .6]
    ta = [[1.0, 0.0], [1.0, 1.0]]
    tb = [[0.0, -1.0], [0.0, 1.0]]
    lam, mix = 0.4, 0.75
    na = np.array(va) / np.linalg.norm(va, axis=1, keepdims=True)
    nb = np.array(vb) / np.linalg.norm(vb, axis=1, keepdims=True)
    target = mix * na + (1 - mix) * nb  # cos normalises it again
    img = np_cos(z, target).mean()
    txt = (mix * np_cos(z, ta) + (1 - mix) * np_cos(z, tb)).mean()
    expected = lam * -img + (1 - lam) * -txt
    got = losses.vl2v_loss(t(z), t(va), t(ta), lam, t(vb), t(tb), mix).item()
    assert got == pytest.approx(expected, abs=1e-6)
    # normalising before mixing matters: mixing the raw embeddings gives another value
    raw = mix * np.array(va) + (1 - mix) * np.array(vb)
    assert abs((lam * -np_cos(z, raw).mean() + (1 - lam) * -txt) - expected) > 1e-2


def test_vl2v_loss_cutmix_with_mix_one_is_plain_loss():
    z = [[1.0, 2.0], [-1.0, 0.5]]
    va, vb = [[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [-3.0, 1.0]]
    ta, tb = [[0.0, 1.0], [1.0, -1.0]], [[5.0, 5.0], [0.0, -2.0]]
    lam = 0.5
    expected = lam * -np_cos(z, va).mean() + (1 - lam) * -np_cos(z, ta).mean()
    mixed = losses.vl2v_loss(t(z), t(va), t(ta), lam, t(vb), t(tb), 1.0).item()
    plain = losses.vl2v_loss(t(z), t(va), t(ta), lam).item()
    assert mixed == pytest.approx(expected, abs=1e-6)
    assert plain == pytest.approx(expected, abs=1e-6)


def test_mixed_mean():
    a, b = t([1.0, 2.0, 6.0]), t([10.0, 0.0, 2.0])
    assert losses.mixed_mean(a, None, 0.2).item() == pytest.approx(3.0)
    assert losses.mixed_mean(a, b, 0.2).item() == pytest.approx(0.2 * 3.0 + 0.8 * 4.0)
    assert losses.mixed_mean(a, b, 1.0).item() == pytest.approx(3.0)


# ============================================================================= data/cutmix.py
class StubRng:
    """Stands in for np.random.Generator with chosen draws (beta, permutation, integers)."""

    def __init__(self, lam=0.5, permutation=None, integers=()):
        self.lam, self.perm, self.ints = lam, permutation, list(integers)

    def beta(self, a, b):
        return self.lam

    def permutation(self, n):
        return np.asarray(self.perm, dtype=np.int64)

    def integers(self, n):
        value = self.ints.pop(0)
        assert 0 <= value < n
        return value


def constant_images(b, c, h, w):
    """Image i is filled with the value i + 1 (distinct per image)."""
    return torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, c, h, w).clone()


def test_rand_bbox_clipped_exact():
    # H=6, W=8, lam=.5: cut = sqrt(.5); cut_h = int(4.24) = 4, cut_w = int(5.66) = 5; half = 2, 2
    # centre (5, 0): y in [3, clip(7)=6), x in [clip(-2)=0, 2)
    assert rand_bbox(6, 8, 0.5, StubRng(integers=[5, 0])) == (3, 6, 0, 2)
    # centre (0, 7): y in [0, 2), x in [5, clip(9)=8)
    assert rand_bbox(6, 8, 0.5, StubRng(integers=[0, 7])) == (0, 2, 5, 8)


def test_cutmix_exact_with_stub_rng():
    images = constant_images(3, 2, 6, 8)
    mixed, perm, mix = cutmix(images, StubRng(lam=0.5, permutation=[2, 0, 1], integers=[5, 0]))
    # box (3, 6, 0, 2) as above: area 6 of 48
    assert mix == 1 - 6 / 48
    assert perm.tolist() == [2, 0, 1]
    expected = images.clone()
    for i, src in enumerate([2, 0, 1]):
        expected[i, :, 3:6, 0:2] = src + 1
    assert torch.equal(mixed, expected)
    assert torch.equal(images, constant_images(3, 2, 6, 8))  # the input is not modified


def test_cutmix_box_matches_mix_for_many_seeds():
    b, c, h, w = 6, 2, 7, 11  # not square: H and W must not be swapped
    images = constant_images(b, c, h, w)
    found = clipped = empty = 0
    for seed in range(200):
        mixed, perm, mix = cutmix(images, np.random.default_rng(seed))
        assert perm.dtype == torch.int64
        assert sorted(perm.tolist()) == list(range(b))
        changed = (mixed != images)
        assert torch.equal(changed[:, 0], changed[:, 1])  # all channels alike
        movers = [i for i in range(b) if perm[i] != i]
        for i in range(b):
            if perm[i] == i:
                assert torch.equal(mixed[i], images[i])
        if not movers:
            continue
        mask = changed[movers[0], 0]
        for i in movers:  # the same box in every image
            assert torch.equal(changed[i, 0], mask)
        area = int(mask.sum())
        if area == 0:
            empty += 1
            assert mix == 1.0
            continue
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert area == (y2 - y1) * (x2 - x1)  # a full rectangle
        assert mix == 1.0 - area / (h * w)
        for i in movers:
            assert (mixed[i, :, y1:y2, x1:x2] == perm[i] + 1).all()  # from images[perm]
            outside = mixed[i].clone()
            outside[:, y1:y2, x1:x2] = i + 1
            assert (outside == i + 1).all()
        found += 1
        clipped += y1 == 0 or x1 == 0 or y2 == h or x2 == w
    assert found > 100 and clipped > 10


def test_cutmix_same_seed_same_result():
    images = torch.randn(5, 3, 9, 9)
    m1, p1, x1 = cutmix(images, np.random.default_rng(123))
    m2, p2, x2 = cutmix(images, np.random.default_rng(123))
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and x1 == x2


def test_rand_bbox_within_bounds():
    rng = np.random.default_rng(0)
    for lam in [0.0, 1.0, *np.linspace(0, 1, 101), *rng.random(300)]:
        for h, w in [(7, 11), (32, 32), (1, 5)]:
            y1, y2, x1, x2 = rand_bbox(h, w, float(lam), rng)
            assert all(isinstance(v, int) for v in (y1, y2, x1, x2))
            assert 0 <= y1 <= y2 <= h and 0 <= x1 <= x2 <= w


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.64, 0.9])
def test_rand_bbox_area_about_one_minus_lam_at_centre(lam):
    h = w = 200
    y1, y2, x1, x2 = rand_bbox(h, w, lam, StubRng(integers=[100, 100]))
    assert (y2 - y1) * (x2 - x1) / (h * w) == pytest.approx(1 - lam, abs=0.02)


# ============================================================================== stages/swad.py
def test_running_average_float_mean_int_last():
    states = [{"w": t([1.0, 2.0]), "n": torch.tensor(3)},
              {"w": t([3.0, 6.0]), "n": torch.tensor(5)},
              {"w": t([5.0, 1.0]), "n": torch.tensor(7)}]
    avg = RunningAverage()
    assert avg.state is None
    for s in states:
        avg.add(s)
    assert avg.count == 3
    assert avg.state["w"].tolist() == pytest.approx([3.0, 3.0])
    assert avg.state["n"].item() == 7 and not avg.state["n"].is_floating_point()
    assert states[0]["w"].tolist() == [1.0, 2.0]  # inputs are not modified


def test_running_average_weights_and_float32():
    avg = RunningAverage()
    avg.add({"w": torch.tensor([2.0], dtype=torch.float16)})
    avg.add({"w": torch.tensor([6.0], dtype=torch.float16)}, weight=3)
    assert avg.count == 4
    assert avg.state["w"].dtype == torch.float32
    assert avg.state["w"].item() == pytest.approx((1 * 2.0 + 3 * 6.0) / 4)


def test_running_average_start_is_replaced_by_first_add():
    start = {"w": t([10.0]), "n": torch.tensor(1)}
    avg = RunningAverage(start=start)
    assert avg.count == 0 and avg.state["w"].item() == 10.0
    start["w"] += 1  # the start was copied
    assert avg.state["w"].item() == 10.0
    avg.add({"w": t([2.0]), "n": torch.tensor(2)})
    assert avg.count == 1 and avg.state["w"].item() == 2.0  # replaced, not (10 + 2) / 2
    avg.add({"w": t([4.0]), "n": torch.tensor(3)})
    assert avg.count == 2 and avg.state["w"].item() == 3.0 and avg.state["n"].item() == 3
    again = RunningAverage.from_state_dict(avg.state_dict())
    assert again.count == 2 and again.state["w"].item() == 3.0


# --- LossValley ------------------------------------------------------------------------------
N_SEG = 24


def seg(i, loss):
    """Segment i covers steps 10(i-1)+1 .. 10i; its weights identify it: w = i and a one-hot."""
    return Segment({"w": t([float(i)]), "hot": nn.functional.one_hot(torch.tensor(i), N_SEG).float()},
                   loss, 10 * (i - 1) + 1, 10 * i)


def steps_of(*ids):
    return [(10 * (i - 1) + 1, 10 * i) for i in ids]


def averaged(valley, state):
    """The multiset of segment ids in an average (from the one-hot part and the count)."""
    counts = (state["hot"] * max(valley.final.count, 1)).round().long().tolist()
    return Counter({i: c for i, c in enumerate(counts) if c})


def feed(valley, losses_by_segment):
    for i, loss in enumerate(losses_by_segment, start=1):
        valley.update(seg(i, loss))


def test_loss_valley_not_converged_returns_last_segment():
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(valley, [10, 9, 8, 7, 6, 5, 4])  # always falling: never "first of 3 is the minimum"
    assert not valley.converged and valley.threshold is None
    final = valley.final_state()
    assert final["w"].item() == 7.0
    assert valley.segments_used == []
    assert LossValley().final_state() is None


# The main valley. Segment i has loss L[i]:
#   i : 1    2    3    4    5    6    7    8    9    10   11    12   13    14   15   16 17 18 19
#   L : 3    2.5  2    1.4  1.3  1.2  1.0  1.2  1.1  1.3  1.35  1.4  1.42  2.0  2.5  3  3  3  3
# Convergence needs the first of the last 3 losses to be their minimum (ties: the first index).
# k=3..8 fail ([3,2.5,2] ... [1.2,1.0,1.2] has its minimum in the middle); k=9: [1.0,1.2,1.1] ->
# converged, converge segment 7, converge_step = 70, threshold = mean(1.0,1.2,1.1)*1.3 = 1.43.
# final = RunningAverage(start=seg7). smooth_q = segs 4..9, Q = smooth_q[:6-3+1] = segs 4..7,
# none above 1.43 -> start_idx = 0 -> add Q[1:] = 5, 6, 7 (the first add REPLACES the start seg 7,
# as AveragedModel with n_averaged=0 does): average {5, 6, 7}.
# k=10: smooth_q[0] = 5 ends at 50 < 70: skip.  k=11: 6 ends at 60: skip.
# k=12: smooth_q = 7..12, 7 ends at 70 (not < 70), min = 1.0 <= 1.43 -> add 7 (a second time,
#       as the official code does).  k=13: 8..13 min 1.1 -> add 8.  k=14: 9..14 min 1.1 -> add 9.
# k=15: 10..15 min 1.3 -> add 10.  k=16: min 1.35 -> add 11.  k=17: min 1.4 -> add 12.
# k=18: 13..18 min 1.42 -> add 13.  k=19: 14..19 min 2.0 > 1.43 -> dead; nothing more is added.
MAIN = [3, 2.5, 2, 1.4, 1.3, 1.2, 1.0, 1.2, 1.1, 1.3, 1.35, 1.4, 1.42, 2.0, 2.5, 3, 3, 3, 3]
MAIN_AVERAGE = [5, 6, 7, 7, 8, 9, 10, 11, 12, 13]


def test_loss_valley_converges_and_initial_adds():
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(valley, MAIN[:8])
    assert not valley.converged
    feed_from(valley, MAIN, 9, 9)
    assert valley.converged and valley.converge_step == 70
    assert valley.threshold == pytest.approx(1.43)
    assert valley.segments_used == steps_of(5, 6, 7)
    assert averaged(valley, valley.final.state) == Counter({5: 1, 6: 1, 7: 1})
    assert valley.final.state["w"].item() == pytest.approx(6.0)


def feed_from(valley, losses_by_segment, first, last):
    for i in range(first, last + 1):
        valley.update(seg(i, losses_by_segment[i - 1]))


def test_loss_valley_dies_after_blow_up_and_ignores_later_segments():
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(valley, MAIN[:18])
    assert not valley.dead_valley
    feed_from(valley, MAIN, 19, 19)
    assert valley.dead_valley
    valley.update(seg(20, 1.0))  # a good loss after death changes nothing
    valley.update(seg(21, 0.5))
    final = valley.final_state()
    assert averaged(valley, final) == Counter(MAIN_AVERAGE)
    assert final["w"].item() == pytest.approx(sum(MAIN_AVERAGE) / len(MAIN_AVERAGE))  # 8.8
    assert valley.segments_used == steps_of(*MAIN_AVERAGE)


@pytest.mark.parametrize("last", [13, 15])
def test_loss_valley_final_state_drains_the_window(last):
    # Training ends inside the valley.
    # last=13: average {5,6,7,7,8}; smooth_q = 8..13. final_state drops 8 (already in), then adds
    #   9 (min 1.1), 10 (1.3), 11 (1.35), 12 (1.4), 13 (1.42) while the window minimum <= 1.43.
    # last=15: k=14, 15 add 9, 10; smooth_q = 10..15; drop 10, add 11 (1.35), 12 (1.4), 13 (1.42),
    #   then [14, 15] has min 2.0 > 1.43: stop. Both give the same set as the dead valley above.
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(valley, MAIN[:last])
    final = valley.final_state()
    assert not valley.dead_valley
    assert averaged(valley, final) == Counter(MAIN_AVERAGE)
    assert final["w"].item() == pytest.approx(8.8)
    assert valley.segments_used == steps_of(*MAIN_AVERAGE)


def test_loss_valley_skips_segments_above_threshold_before_convergence():
    # L: 6 5 4 3 2 1.3 1.0 1.2 1.1 -> converged at k=9 (segment 7), threshold 1.43.
    # Q = segs 4..7 = [3, 2, 1.3, 1.0]; from the end, segment 5 (2 > 1.43) is the last one above:
    # start_idx = 2, add Q[3:] = [7] (segment 6 at Q[start_idx] is skipped, as officially).
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(valley, [6, 5, 4, 3, 2, 1.3, 1.0, 1.2, 1.1])
    assert valley.converge_step == 70
    assert valley.segments_used == steps_of(7)
    assert averaged(valley, valley.final.state) == Counter({7: 1})


def test_loss_valley_early_convergence_official_behaviour():
    # Converging at the 3rd segment, while smooth_q is not yet full, is where the official rule
    # counts segments several times: L = 1.0 1.2 1.1 1.2 1.2 1.2 1.2, threshold 1.43.
    # k=3: Q = smooth_q[:4] = segs 1..3, all <= 1.43 -> add 2, 3 (2 replaces the start seg 1).
    # k=4, 5, 6: smooth_q[0] is still seg 1 (the deque is not full), ends at 10 == converge_step
    #   -> add 1 three times.  k=7: smooth_q = 2..7 -> add 2.
    # final_state: drop 2, then add 3, 4, 5, 6, 7 (window minima 1.1, 1.2, ... <= 1.43).
    # Pinned so that a change of this (official) behaviour is deliberate.
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(valley, [1.0, 1.2, 1.1, 1.2, 1.2, 1.2, 1.2])
    final = valley.final_state()
    expected = [2, 3, 1, 1, 1, 2, 3, 4, 5, 6, 7]
    assert valley.segments_used == steps_of(*expected)
    assert averaged(valley, final) == Counter(expected)


def test_loss_valley_state_dict_round_trip_continues_identically():
    full = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(full, MAIN[:15])
    expected = full.final_state()

    first = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    feed(first, MAIN[:11])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as distill's checkpoint does
    buffer.seek(0)
    resumed = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    feed_from(resumed, MAIN, 12, 15)
    got = resumed.final_state()
    assert resumed.segments_used == full.segments_used == steps_of(*MAIN_AVERAGE)
    assert torch.equal(got["hot"], expected["hot"])


def test_loss_valley_segments_used_names_the_converge_segment_when_nothing_else_is_added():
    # n_converge = n_tolerance = 3: L = 0.1, 10, 10, 10. k=3: [0.1, 10, 10] -> converged on seg 1,
    # threshold = 20.1 / 3 * 1.3 = 8.71; no initial adds. k=4: smooth_q = 2..4, min 10 > 8.71 ->
    # dead. The final weights are segment 1's (the AveragedModel start) ...
    valley = LossValley(n_converge=3, n_tolerance=3, tolerance_ratio=0.3)
    feed(valley, [0.1, 10, 10, 10])
    assert valley.dead_valley
    final = valley.final_state()
    assert final["w"].item() == 1.0
    # ... so segments_used (reported as summary["swad_segments"]) must say so, not [].
    assert valley.segments_used == steps_of(1)


def test_loss_valley_converge_and_stop_steps_of_a_loss_sequence():
    # Validations every 200 steps. Stated from the official rule: the valley converges at the first
    # validation where the oldest of the last 3 losses is their minimum: at step 1000 the last 3
    # are (1.0, 1.1, 1.2), so it converges on the segment ending at step 600, threshold
    # 1.3 * mean(1.0, 1.1, 1.2) = 1.43. It dies (training stops) at the first validation where
    # the minimum of the last 6 losses exceeds 1.43: at step 2400 they are 1.5 ... 2.1.
    losses_ = [2.0, 1.5, 1.0, 1.1, 1.2, 1.4, 1.5, 1.6, 1.7, 1.8, 2.0, 2.1, 0.1]
    valley = LossValley(n_converge=3, n_tolerance=6, tolerance_ratio=0.3)
    stopped = None
    for k, loss in enumerate(losses_, start=1):
        valley.update(Segment({"w": t([float(k)])}, loss, 200 * (k - 1) + 1, 200 * k))
        if valley.dead_valley:
            stopped = 200 * k
            break
    assert valley.converge_step == 600
    assert valley.threshold == pytest.approx(1.43)
    assert stopped == 2400


def test_segments_restart_only_at_steps_3000_4000_5000_by_default():
    # The official default (swad_fix): of the validations of a 5001-step run every 200 steps,
    # the segment restarts after 3000, 4000 and 5000 only; before that it averages from step 1.
    from stages.swad import restarts_segment
    assert [s for s in range(200, 5001, 200) if restarts_segment(s)] == [3000, 4000, 5000]


def test_validation_loss_is_the_cross_entropy_of_the_100_cos_logits():
    # ADiP validates (and feeds SWAD) with the cross-entropy of 100 * cos(z, t_c), not its -cos loss.
    text = text_targets()
    model = ADiP.build(nn.Linear(D, D), D, text)
    with torch.no_grad():
        for layer in (model.backbone, model.projection):
            layer.weight.copy_(torch.eye(D))
            layer.bias.zero_()
    method = ADiP(model, text, steps=1)
    z = [[1.0, 0.1], [0.2, 1.0]]
    logits, loss = method.score(Batch(t(z), torch.tensor([0, 2]), t([[1.0, 0.0], [0.0, 1.0]])))
    expected_logits = 100 * np.array([[np_cos(zi, c) for c in CLASSIFIER] for zi in z])
    assert logits.double().numpy() == pytest.approx(expected_logits, abs=1e-3)
    assert loss == pytest.approx(np_ce(expected_logits, [0, 2]), rel=1e-4)


# =========================================================================== stages/methods.py
C, D, A = 3, 2, 2
CLASSIFIER = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
ENSEMBLE = [[0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]
ANCHORS = [[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [0.8, 0.6]], [[-1.0, 0.0], [0.0, -1.0]]]


def text_targets():
    return TextTargets(classifier=t(CLASSIFIER), ensemble=t(ENSEMBLE), anchors=t(ANCHORS))


def tiny_batch(cutmix_=False):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    emb = torch.randn(4, D, generator=g)
    if not cutmix_:
        return Batch(images, labels, emb)
    return Batch(images, labels, emb, torch.tensor([2, 0, 1, 1]), emb[[3, 0, 1, 2]], 0.6)


def make(cls, backbone=None, dim=3, steps=10, **hp):
    text = text_targets()
    torch.manual_seed(0)
    backbone = backbone if backbone is not None else nn.Linear(4, dim)
    return cls(cls.build(backbone, dim, text), text, steps, **hp)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_adip_update_trains_backbone_only():
    method = make(ADiP, lr=1e-2)
    before = snapshot(method.model)
    for _ in range(2):
        method.update(tiny_batch())
    after = method.model.state_dict()
    assert not torch.equal(before["backbone.weight"], after["backbone.weight"])
    assert not torch.equal(before["backbone.bias"], after["backbone.bias"])
    for k in ("projection.weight", "projection.bias", "classifier"):
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(method.model.classifier, t(CLASSIFIER))


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_adip_loss_hand_computed(use_cutmix):
    method = make(ADiP, lam=0.3)
    z = [[1.0, 2.0], [-1.0, 0.5], [0.3, 0.3], [2.0, -0.5]]
    b = tiny_batch(use_cutmix)
    emb, cls_ = b.image_emb.double().numpy(), np.array(CLASSIFIER)
    ya = b.labels.tolist()
    if use_cutmix:
        emb_b = b.image_emb_b.double().numpy()
        target = (b.mix * emb / np.linalg.norm(emb, axis=1, keepdims=True)
                  + (1 - b.mix) * emb_b / np.linalg.norm(emb_b, axis=1, keepdims=True))
        txt = b.mix * np_cos(z, cls_[ya]) + (1 - b.mix) * np_cos(z, cls_[b.labels_b.tolist()])
    else:
        target, txt = emb, np_cos(z, cls_[ya])
    expected = 0.3 * -np_cos(z, target).mean() + 0.7 * -txt.mean()
    assert method.loss(t(z), b).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("cls", [ADiP, SD, ERM, KD])
def test_batchnorm_statistics_frozen_affine_trained(cls):
    # The official VL2V trainer keeps BatchNorm in eval mode: after training steps the running
    # statistics are exactly the initial ones, while gamma/beta (trainable) have moved.
    bn = nn.BatchNorm1d(D)
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    method = make(cls, backbone=nn.Sequential(nn.Linear(4, D), bn), dim=D, lr=1e-2)
    for _ in range(3):
        method.update(tiny_batch())
    assert bn.running_mean.tolist() == [0.5, 0.5]
    assert bn.running_var.tolist() == [2.0, 2.0]
    assert bn.num_batches_tracked.item() == 0
    assert not torch.equal(bn.weight.detach(), torch.ones(D))
    assert not torch.equal(bn.bias.detach(), torch.zeros(D))
    assert method.model.training and not bn.training


def test_rise_batchnorm_statistics_update_as_its_trainer():
    bn = nn.BatchNorm1d(D)
    method = make(RISE, backbone=nn.Sequential(nn.Linear(4, D), bn), dim=D)
    method.update(tiny_batch())
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, torch.zeros(D))


def test_sd_trains_the_whole_tower_with_the_text_head():
    method = make(SD, backbone=nn.Linear(4, D), dim=D, lr=1e-2)
    assert isinstance(method.model.projection, nn.Identity)
    before = snapshot(method.model)
    method.update(tiny_batch())
    assert not torch.equal(before["backbone.weight"], method.model.state_dict()["backbone.weight"])
    assert torch.equal(before["classifier"], method.model.classifier)
    logits = method.predict(torch.zeros(1, 4) + 1)
    z = method.model.backbone(torch.ones(1, 4)).detach().double().numpy()[0]
    assert logits[0].tolist() == pytest.approx([100 * np_cos(z, c) for c in CLASSIFIER], abs=1e-3)


def test_rise_head_init_and_optimizer():
    method = make(RISE, steps=10)
    head = method.model.head
    assert torch.equal(head.weight.detach(), t(ENSEMBLE))
    assert torch.equal(head.bias.detach(), torch.zeros(C))
    assert method.model.projector.weight.shape == (D, 3)
    opt = method.optimizer
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3)
    assert group["momentum"] == 0.9 and group["weight_decay"] == pytest.approx(5e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in method.model.parameters()}


def test_rise_lr_drops_tenfold_after_80_percent_of_steps():
    method = make(RISE, steps=10)
    lrs = []
    for _ in range(10):
        method.update(tiny_batch())
        lrs.append(method.optimizer.param_groups[0]["lr"])
    # after update k the scheduler has stepped k times; step_size = int(0.8 * 10) = 8:
    # updates 1..8 ran at 1e-3, updates 9 and 10 at 1e-4, and there is no second drop
    assert lrs[:7] == pytest.approx([1e-3] * 7)
    assert lrs[7:] == pytest.approx([1e-4] * 3)


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_rise_loss_hand_computed(use_cutmix):
    method = make(RISE)
    s = np.array([[2.0, 1.0], [0.5, -1.0], [-0.3, 0.8], [1.0, 1.0]])
    logits = np.array([[1.0, 0.5, -0.5], [0.2, 0.1, 0.3], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.4]])
    b = tiny_batch(use_cutmix)
    T, ens, anc = 3.0, np.array(ENSEMBLE), np.array(ANCHORS)

    def teacher_probs(emb):
        tl = np.array([[100 * np_cos(v, e) for e in ens] for v in emb])  # 100 cos(v, e_c)
        return np_softmax(tl / T)

    def dist(labels):
        ad = np.array([1 - np_cos(s[i], ens[y]) for i, y in enumerate(labels)])
        rd = np.array([np_rd(s[i], ens[y], anc[y]) for i, y in enumerate(labels)])
        return (ad + rd).mean()

    ya = b.labels.tolist()
    p = teacher_probs(b.image_emb.double().numpy())
    ce, d = np_ce(logits, ya), dist(ya)
    if use_cutmix:
        yb, m = b.labels_b.tolist(), b.mix
        p = m * p + (1 - m) * teacher_probs(b.image_emb_b.double().numpy())
        ce = m * ce + (1 - m) * np_ce(logits, yb)
        d = m * d + (1 - m) * dist(yb)
    expected = 0.9 * np_kd(logits, p, T) + 0.1 * ce + 1.0 * d
    got = method.loss((t(s.tolist()), t(logits.tolist())), b).item()
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("use_cutmix", [False, True])
@pytest.mark.parametrize("hp", [{}, {"temperature": 2.0, "alpha": 0.3}])
def test_kd_loss_of_method_hand_computed(use_cutmix, hp):
    method = make(KD, **hp)
    T, alpha = hp.get("temperature", 4.0), hp.get("alpha", 0.5)
    logits = np.array([[1.0, 0.5, -0.5], [0.2, 0.1, 0.3], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.4]])
    b = tiny_batch(use_cutmix)
    cls_ = np.array(CLASSIFIER)

    def teacher_probs(emb):
        tl = np.array([[100 * np_cos(v, c) for c in cls_] for v in emb])  # 100 cos(v, t_c)
        return np_softmax(tl / T)

    ya = b.labels.tolist()
    p, ce = teacher_probs(b.image_emb.double().numpy()), np_ce(logits, ya)
    if use_cutmix:
        m = b.mix
        p = m * p + (1 - m) * teacher_probs(b.image_emb_b.double().numpy())
        ce = m * ce + (1 - m) * np_ce(logits, b.labels_b.tolist())
    expected = alpha * np_kd(logits, p, T) + (1 - alpha) * ce
    assert method.loss(t(logits.tolist()), b).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_erm_loss_is_plain_cross_entropy(use_cutmix):
    method = make(ERM)
    assert isinstance(method.model.head, nn.Linear) and method.model.head.out_features == C
    logits = np.array([[1.0, 0.5, -0.5], [0.2, 0.1, 0.3], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.4]])
    b = tiny_batch(use_cutmix)
    expected = np_ce(logits, b.labels.tolist())
    if use_cutmix:
        expected = b.mix * expected + (1 - b.mix) * np_ce(logits, b.labels_b.tolist())
    assert method.loss(t(logits.tolist()), b).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("cls", [ADiP, SD, ERM, KD, RISE])
def test_evaluate_and_predict_do_not_change_the_model(cls):
    dim = D if cls is SD else 3
    backbone = nn.Sequential(nn.Linear(4, dim), nn.BatchNorm1d(dim))
    method = make(cls, backbone=backbone, dim=dim, lr=1e-2)
    method.update(tiny_batch())  # non-trivial BatchNorm statistics and optimiser state
    before = snapshot(method.model)
    b = tiny_batch()
    logits, loss = method.score(b)
    assert logits.shape == (4, C) and isinstance(loss, float) and math.isfinite(loss)
    pred = method.predict(b.images)
    assert pred.shape == (4, C)
    assert torch.equal(pred, logits)  # eval mode both times: same numbers
    after = method.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# =========================================================================== model selection
def test_model_selection_is_the_mean_of_per_domain_validation_accuracies():
    # Domain A: 1 validation image, classified right; domain B: 3 images, 1 right. DomainBed's
    # training-domain validation is (1/1 + 1/3) / 2 = 2/3, not the pooled 2/4.
    from stages.fit import fit_on_cache
    features = t([[[1.0, 0.0]], [[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]])  # [N, K=1, d]
    labels = torch.tensor([0, 0, 1, 0, 0])  # predictions: feature [1, 0] -> 0, [0, 1] -> 1
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    _, log = fit_on_cache(head, features, [np.array([4]), np.array([4])], [np.array([0]), np.array([1, 2, 3])],
                          loss=lambda out, rows, items: out.sum() * 0, logits=lambda out: out, labels=labels,
                          steps=1, per_domain=1, lr=0.0, weight_decay=0.0, seed=0, eval_every=1, desc="test")
    assert log[-1]["best_source_val_acc"] == pytest.approx((1 / 1 + 1 / 3) / 2)


def test_reported_source_val_accuracy_weighs_domains_equally():
    from stages.evaluate import summarize
    result = summarize({"a": 1.0, "b": 1 / 3, "held": 0.25}, {}, "held", {"a": 1, "b": 3, "held": 8})
    assert result["source_val_acc"] == pytest.approx(2 / 3)
    assert result["holdout_acc"] == 0.25


# =========================================================================== prompts and text targets
class RecordingTeacher:
    """Embeds prompt i as a fixed raw vector and records the exact prompt strings."""

    def __init__(self, vectors):
        self.vectors, self.prompts = vectors, []

    def encode_texts(self, texts, normalize=True):
        self.prompts += texts
        raw = t([self.vectors[len(self.prompts) - len(texts) + i] for i in range(len(texts))])
        return nn.functional.normalize(raw, dim=-1) if normalize else raw


def test_rise_ensemble_averages_raw_embeddings_then_normalises():
    # Two templates with raw embeddings [3, 0] and [0, 1]: RISE's mean is [1.5, 0.5] -> [0.9487, 0.3162];
    # VL2V's mean of normalised vectors would be [0.5, 0.5] -> [0.7071, 0.7071].
    from stages.extract import encode_class_texts
    from stages.teacher import rise_ensemble, text_classifier
    teacher = RecordingTeacher([[3.0, 0.0], [0.0, 1.0]])
    raw = encode_class_texts(teacher, ["cat"], ("{}", "{}!"), rise=True)
    assert rise_ensemble(raw)[0].tolist() == pytest.approx([1.5 / math.sqrt(2.5), 0.5 / math.sqrt(2.5)])
    teacher = RecordingTeacher([[3.0, 0.0], [0.0, 1.0]])
    normalised = encode_class_texts(teacher, ["cat"], ("{}", "{}!"))
    assert text_classifier(normalised)[0].tolist() == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])


def test_prompt_strings_are_the_official_ones():
    from stages.extract import encode_anchors, encode_class_texts
    from stages.prompts import TEMPLATE_SETS
    teacher = RecordingTeacher([[1.0, 0.0]] * 20)
    encode_class_texts(teacher, ["Alarm_Clock"], TEMPLATE_SETS["photo"])
    assert teacher.prompts == ["a photo of a Alarm Clock"]  # VL2V: "_" -> " ", no period
    teacher = RecordingTeacher([[1.0, 0.0]] * 20)
    encode_class_texts(teacher, ["Alarm_Clock"], TEMPLATE_SETS["rise7"], rise=True)
    assert teacher.prompts == ["itap of a Alarm_Clock.", "a bad photo of the Alarm_Clock.", "a origami Alarm_Clock.",
                               "a photo of the large Alarm_Clock.", "a Alarm_Clock in a video game.",
                               "art of the Alarm_Clock.", "a photo of the small Alarm_Clock."]
    teacher = RecordingTeacher([[1.0, 0.0]] * 20)
    encode_anchors(teacher, ["Alarm_Clock"], ["art_painting", "bright photo"])
    assert teacher.prompts == ["a art_painting of a Alarm_Clock", "a bright photo of a Alarm_Clock"]


def test_batchnorm_trains_normally_when_freezing_is_switched_off():
    # Distill switches freezing off for a random-init student (its statistics are just 0 and 1).
    bn = nn.BatchNorm1d(D)
    method = make(ADiP, backbone=nn.Sequential(nn.Linear(4, D), bn), dim=D, freeze_batchnorm=False)
    method.update(tiny_batch())
    assert bn.num_batches_tracked.item() == 1
