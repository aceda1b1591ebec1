"""The teacher: anything that embeds images and texts into one L2-normalised space.

``OpenClipTeacher`` wraps open_clip. A black-box teacher (embeddings from a service) only
needs the same four members: ``identity``, ``input_spec``, ``encode_images``, ``encode_texts``.
"""
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from cache.fingerprint import sha256_file, sha256_json
from cache.teacher_cache import LOGIT_SCALE
from data.views import InputSpec
from cache.errors import UserError
from stages.runtime import device


class OpenClipTeacher:
    def __init__(self, name: str, pretrained: str | None = None, device: str = "cpu"):
        import open_clip

        self.name, self.pretrained, self.device = name, pretrained or None, torch.device(device)
        if self.pretrained in ("none", "None", ""):
            self.pretrained = None
        if name.startswith("local-dir:") and not Path(name[len("local-dir:"):]).is_dir():
            raise UserError(f"teacher folder not found: {name[len('local-dir:'):]}")
        torch.manual_seed(0)  # a config without weights gets the same random init every time
        logging.disable(logging.WARNING)  # open_clip logs through the root logger; we report ourselves
        try:
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=self.pretrained)
        except Exception as e:  # open_clip and torch.load raise many types for unusable input
            if "not found" in str(e) and "Model config" in str(e):
                hint = f"'{name}' is not an open_clip model (see open_clip.list_models())"
            elif self.pretrained and os.path.isfile(self.pretrained):
                hint = (f"{self.pretrained} is not a checkpoint for this model (a state dict saved with "
                        f"torch.save, or safetensors, with matching keys): {type(e).__name__}")
            else:
                hint = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot load teacher {name} (pretrained={self.pretrained}): {hint}")
        finally:
            logging.disable(logging.NOTSET)
        self.model = model.eval().to(self.device)
        # The teacher's own logit rule, ``scale * cos + bias`` (OpenAI CLIP: 100, no bias; SigLIP
        # learns both): recorded in the cache and used by zero-shot and every method's teacher logits.
        # (4 decimals: exp of a float32 ln(100) is 100.0000076, and 100 should read as 100)
        self.logit_scale = round(float(model.logit_scale.detach().double().exp()), 4) \
            if hasattr(model, "logit_scale") else LOGIT_SCALE
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = float(bias.detach()) if bias is not None else 0.0
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.input_spec = InputSpec(size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                                    interpolation=cfg.get("interpolation", "bicubic"))

    @property
    def has_weights(self) -> bool:
        if self.name.startswith("hf-hub:"):
            return True  # the repository holds them (open_clip ignores --pretrained)
        if self.name.startswith("local-dir:"):
            folder = Path(self.name[len("local-dir:"):])
            return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.pth"))
        return self.pretrained is not None

    @property
    def identity(self) -> dict:
        """What makes two teachers the same: recorded in every cache and checked on reuse."""
        return {"teacher": self.name, "pretrained": self.pretrained,
                "checkpoint_sha256": self._checkpoint_hash(),
                "preprocess": self.input_spec.to_dict()}

    def _checkpoint_hash(self) -> str:
        return checkpoint_fingerprint(self.name, self.pretrained)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list, normalize: bool = True) -> torch.Tensor:
        """Text embeddings, L2-normalised unless ``normalize`` is False (RISE averages raw ones)."""
        tokens = self.tokenizer(texts).to(self.device)
        embeddings = self.model.encode_text(tokens).float()
        return (F.normalize(embeddings, dim=-1) if normalize else embeddings).cpu()


def teacher_of_cache(attrs: dict, weights: bool = True) -> OpenClipTeacher:
    """The teacher a teacher cache was made with, from its attributes (its architecture only, without
    ``weights``)."""
    if str(attrs["teacher"]).startswith("ensemble:"):
        raise UserError(f"this needs one teacher's weights (white-box), not an ensemble ({attrs['teacher']}); "
                        f"pick one teacher with --teachers NAME")
    if str(attrs["teacher"]).startswith("remote:"):
        raise UserError(f"this cache was extracted from a remote teacher service ({attrs['teacher']}); this "
                        f"needs the teacher's weights (white-box); a remote teacher has none: extract with a "
                        f"local --teacher NAME --pretrained TAG instead")
    teacher = OpenClipTeacher(attrs["teacher"], attrs["pretrained"] if weights else None,
                              device=str(device()))
    if weights and teacher.identity["checkpoint_sha256"] != attrs["checkpoint_sha256"]:
        raise UserError(f"the teacher checkpoint changed since extraction ({attrs['teacher']}, "
                        f"{attrs['pretrained']}); this needs the teacher the cache was made with")
    return teacher


def checkpoint_fingerprint(name: str, pretrained: str | None) -> str:
    """The teacher's weights, without loading them: file hashes, or the release tag."""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return sha256_json({p.name: sha256_file(p) for p in files})
    if name.startswith("hf-hub:"):
        return f"hf-hub:{name[len('hf-hub:'):]}@{hf_hub_revision(name[len('hf-hub:'):])}"
    if pretrained and os.path.isfile(pretrained):
        return sha256_file(pretrained)
    return f"tag:{pretrained}"  # an open_clip release tag names fixed weights


def hf_hub_revision(repo: str) -> str:
    """The commit an ``hf-hub:`` teacher resolves to now (from the local Hugging Face cache when
    offline): a repository's weights can change under the same name, its commit cannot."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:  # open_clip reads this file first; its snapshot folder is named by the commit
        config = Path(hf_hub_download(repo, "open_clip_config.json"))
    except (OSError, ValueError, HFValidationError) as e:  # not cached offline, no such repository, a bad name
        raise UserError(f"cannot resolve teacher hf-hub:{repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return config.parent.name


def text_classifier(per_template: torch.Tensor) -> torch.Tensor:
    """[classes, templates, dim] normalised embeddings -> [classes, dim] classifier.

    As the official VL2V code: average the normalised template embeddings, re-normalise.
    """
    return F.normalize(per_template.float().mean(dim=1), dim=-1)


def rise_ensemble(raw_per_template: torch.Tensor) -> torch.Tensor:
    """[classes, templates, dim] raw (unnormalised) embeddings -> [classes, dim] class ensemble.

    As the official RISE code: average the raw template embeddings, then normalise.
    """
    return F.normalize(raw_per_template.float().mean(dim=1), dim=-1)
