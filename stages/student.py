"""The student: a timm backbone that turns images into feature vectors."""
import os

import torch

from cache.fingerprint import sha256_file
from data.views import InputSpec
from cache.errors import UserError

# ``imagenet`` means the ImageNet weights of the official VL2V code: torchvision's IMAGENET1K_V1
# ResNet-50, and timm 0.6.12's ViT-B/16 (AugReg, in21k -> in1k; not timm >= 0.9's augreg2 default).
# Other students get timm's default pretrained tag.
OFFICIAL_IMAGENET = {"resnet50": "resnet50.tv_in1k",
                     "vit_base_patch16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k"}


def create_backbone(name: str, weights: str = "imagenet", image_size: int | None = None):
    """A timm model without classifier (``num_classes=0``) and its input spec.

    ``weights``: ``imagenet`` (the official code's weights, ``resolved_weights``), ``none``
    (random init) or a path to a local weights file (safetensors or a state dict).
    """
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown student model '{name}': not a timm model name (see timm.list_models())")
    kwargs = {"num_classes": 0}
    if weights == "none":
        kwargs["pretrained"] = False
    elif weights == "imagenet":
        kwargs["pretrained"] = True
        name = OFFICIAL_IMAGENET.get(name, name)
    elif os.path.isfile(weights):
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": os.path.abspath(weights)})
    else:
        raise UserError(f"student weights must be 'imagenet', 'none' or an existing file; got '{weights}'")
    if image_size and "vit" in name:
        kwargs["img_size"] = image_size  # ViTs build their position embeddings for one size
    torch.manual_seed(0)  # random-init students are reproducible
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:  # timm raises many types for missing or mismatched weights
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if os.path.isfile(weights) and not _readable_weights(weights):
            detail = "not a weights file (safetensors, or a state dict saved with torch.save)"
        raise UserError(f"cannot load student {name} with weights '{weights}': {detail}")
    config = timm.data.resolve_data_config({}, model=model)
    spec = InputSpec(size=int(image_size or config["input_size"][-1]), mean=tuple(config["mean"]),
                     std=tuple(config["std"]), interpolation=config.get("interpolation", "bicubic"))
    return model, spec


def weights_tag(weights: str) -> str:
    if weights in ("imagenet", "none"):
        return weights
    if not os.path.isfile(weights):
        raise UserError(f"student weights must be 'imagenet', 'none' or an existing file; got '{weights}'")
    return "file-" + sha256_file(weights)[:12]


def resolved_weights(name: str, weights: str) -> str:
    """What ``weights`` loads for student ``name``: a timm tag, ``none`` or ``file-<sha256>``."""
    if weights == "imagenet":
        return OFFICIAL_IMAGENET.get(name, f"{name} (timm default pretrained tag)")
    return weights_tag(weights)


def default_size(name: str) -> int:
    import timm

    if not timm.is_model(name):
        raise UserError(f"unknown student model '{name}': not a timm model name (see timm.list_models())")
    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg else 224


def student_key(name: str, weights: str, image_size: int | None) -> str:
    """Folder name for everything computed with this student, e.g. ``resnet50_imagenet_224px``."""
    return f"{name}_{weights_tag(weights)}_{image_size or default_size(name)}px"


def feature_dim(model) -> int:
    return int(model.num_features)


def _readable_weights(path: str) -> bool:
    """Whether ``path`` holds tensors at all (so a load failure is about the model, not the file)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt"):
            return True
    except Exception:
        pass
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False
