"""The cache is exact: it matches running the teacher online on the same replayed views."""
import json

import pytest
import torch

from cache.teacher_cache import TeacherCache
from conftest import invoke
from data.images import ReplayImages
from stages.prompts import TEMPLATE_SETS
from stages.teacher import OpenClipTeacher


def test_cached_targets_equal_online_teacher_on_replayed_views(extracted, teacher_dir):
    from cache.index import read_table
    cache = TeacherCache(extracted / "extract" / "teacher.h5")
    columns, metadata = read_table(extracted / "extract" / "index.parquet")
    teacher = OpenClipTeacher(f"local-dir:{teacher_dir}")
    dataset = ReplayImages(metadata["root"], columns["path"], cache.view_params, teacher.input_spec)
    items = torch.arange(0, 80 * 3, 7)  # a spread of images and views, in another batch composition
    online = teacher.encode_images(torch.stack([dataset[int(i)][1] for i in items]))
    cached = cache.targets(items)
    # float16 storage of unit vectors: half-precision rounding, nothing more
    assert torch.allclose(cached, online, atol=2e-3, rtol=0)


def test_cached_classifier_equals_open_clip_zero_shot_classifier(extracted, teacher_dir):
    import open_clip
    cache = TeacherCache(extracted / "extract" / "teacher.h5")
    teacher = OpenClipTeacher(f"local-dir:{teacher_dir}")
    classes = cache.attrs["classes"]
    reference = open_clip.build_zero_shot_classifier(teacher.model, teacher.tokenizer, classes,
                                                     list(TEMPLATE_SETS["photo"]), device="cpu", use_tqdm=False).T
    assert torch.allclose(cache.classifier, reference.float(), atol=2e-3, rtol=0)
    # RISE's ensemble: the raw text embeddings of its 7 prompts averaged, then normalised
    with torch.no_grad():
        raw = torch.stack([teacher.model.encode_text(teacher.tokenizer([t.format(c) for t in TEMPLATE_SETS["rise7"]]))
                           for c in classes]).float()
    ensemble = raw.mean(1) / raw.mean(1).norm(dim=-1, keepdim=True)
    assert torch.allclose(cache.text([]).ensemble, ensemble, atol=2e-3, rtol=0)


def test_cached_and_online_training_follow_the_same_loss_trajectory(run_copy):
    common = ("--method", "kd", "--holdout", "photo", "--student", "test_resnet", "--student-weights", "none",
              "--student-size", 32, "--steps", 24, "--per-domain", 2, "--eval-every", 4, "--workers", 0)
    out = run_copy / "distill" / "kd" / "test_resnet_none_32px" / "photo" / "seed0"
    assert invoke("distill", "--run", run_copy, *common).exit_code == 0
    cached = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    result = invoke("distill", "--run", run_copy, *common, "--teacher-online")
    assert result.exit_code == 0, result.output
    online = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # every training view (24 steps x 2 images x 3 sources) and 6 validations of 12 source-val images
    assert online[-1]["teacher_image_forwards"] == 24 * 2 * 3 + 6 * 12
    assert cached[-1]["teacher_image_forwards"] == 0
    # Stated tolerance: the targets differ only by float16 rounding, so the mean training loss
    # over each 4-step segment agrees to 1e-3 relative over 24 steps.
    for c, o in zip(cached[:-1], online[:-1]):
        assert o["loss"] == pytest.approx(c["loss"], rel=1e-3), (c, o)
        assert o["source_val_loss"] == pytest.approx(c["source_val_loss"], rel=1e-3)
