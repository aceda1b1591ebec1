"""The real loading paths, exercised on small files the tests write: open_clip local-dir and
checkpoint files, timm weights from a local file."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY_CLIP, write_tiny_teacher
from cache.errors import UserError
from stages.student import create_backbone, student_key
from stages.teacher import OpenClipTeacher


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_dir_teacher_loads_its_checkpoint(tmp_path):
    folder = write_tiny_teacher(tmp_path / "t", seed=5)
    first = OpenClipTeacher(f"local-dir:{folder}")
    again = OpenClipTeacher(f"local-dir:{folder}")
    other = OpenClipTeacher(f"local-dir:{write_tiny_teacher(tmp_path / 'u', seed=6)}")
    assert first.has_weights
    assert _same_weights(first.model, again.model)
    assert not _same_weights(first.model, other.model)
    assert first.identity["checkpoint_sha256"] != other.identity["checkpoint_sha256"]
    assert first.input_spec.size == 32 and first.input_spec.mean == (0.5, 0.5, 0.5)
    images = first.encode_images(torch.randn(3, 3, 32, 32))
    assert images.shape == (3, 32) and torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_named_model_with_checkpoint_file(tmp_path):
    import open_clip

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "TinyTestCLIP.json").write_text(json.dumps(TINY_CLIP["model_cfg"]))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(11)
    reference = open_clip.create_model("TinyTestCLIP")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), checkpoint)
    teacher = OpenClipTeacher("TinyTestCLIP", pretrained=str(checkpoint))
    assert _same_weights(teacher.model, reference)
    assert teacher.identity["pretrained"] == str(checkpoint)
    assert len(teacher.identity["checkpoint_sha256"]) == 64


def test_unknown_teacher_and_missing_tag_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not an open_clip model"):
        OpenClipTeacher("No-Such-Model")
    with pytest.raises(UserError, match="teacher folder not found"):
        OpenClipTeacher(f"local-dir:{tmp_path / 'missing'}")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_student_from_local_weights_file(tmp_path, suffix):
    source, _ = create_backbone("test_resnet", "none")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # differ from the seeded random init
    path = tmp_path / f"student{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded, spec = create_backbone("test_resnet", str(path), image_size=48)
    assert _same_weights(loaded, source)
    assert spec.size == 48
    assert not _same_weights(create_backbone("test_resnet", "none")[0], source)
    assert student_key("test_resnet", str(path), 48).startswith("test_resnet_file-")
    assert student_key("test_resnet", "none", None) == "test_resnet_none_160px"


def test_student_features_have_the_models_width():
    model, spec = create_backbone("test_vit", "none", image_size=32)
    features = model.eval()(torch.randn(2, 3, spec.size, spec.size))
    assert features.shape == (2, model.num_features)


@pytest.mark.parametrize("name, tag", [("resnet50", "resnet50.tv_in1k"),
                                       ("vit_base_patch16_224", "vit_base_patch16_224.augreg_in21k_ft_in1k")])
def test_imagenet_student_weights_are_the_official_ones(monkeypatch, name, tag):
    # No network: timm.create_model is replaced by a recorder that builds a tiny random model.
    import timm
    from stages.student import create_backbone, resolved_weights
    real_create, calls = timm.create_model, []

    def recording_create(model_name, **kwargs):
        calls.append((model_name, kwargs.get("pretrained")))
        return real_create("test_resnet", pretrained=False, num_classes=0)

    monkeypatch.setattr(timm, "create_model", recording_create)
    create_backbone(name, "imagenet", 32)
    assert calls == [(tag, True)]
    assert resolved_weights(name, "imagenet") == tag
    create_backbone(name, "none", 32)
    assert calls[-1] == (name, False) and resolved_weights(name, "none") == "none"
