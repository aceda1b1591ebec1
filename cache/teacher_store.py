"""Reading the teacher cache (``teacher.h5``, written by ``stages/extract.py``) into memory.

Training reads every array once; nothing here needs the teacher model.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from cache import store


@dataclass
class TextTargets:
    """The teacher's text side."""

    classifier: torch.Tensor  # [C, D] the chosen templates, averaged and normalised
    ensemble: torch.Tensor    # [C, D] RISE's 7-template ensemble, averaged and normalised
    anchors: torch.Tensor     # [C, A, D] "a {d} of a {class}." for the chosen anchor names d


class TeacherCache:
    def __init__(self, store_path):
        self.path = Path(store_path)
        self.attrs = store.read_attrs(self.path)
        self.image_emb = torch.from_numpy(store.read(self.path, "image_emb"))  # float16
        self.view_params = store.read(self.path, "view_params")
        self.classifier = torch.from_numpy(store.read(self.path, "classifier")).float()
        self.n_views = self.image_emb.shape[1]
        self.anchor_names = self.attrs["anchor_names"]

    @property
    def dim(self) -> int:
        return self.image_emb.shape[-1]

    def targets(self, items: torch.Tensor) -> torch.Tensor:
        """Teacher image embeddings (float32) of flat items ``row * n_views + view``."""
        return self.image_emb.flatten(0, 1)[items].float()

    def text(self, anchors: list) -> TextTargets:
        """The text targets, with RISE's anchors restricted to the given anchor names."""
        chosen = [self.anchor_names.index(a) for a in anchors]
        return TextTargets(classifier=self.classifier,
                           ensemble=torch.from_numpy(store.read(self.path, "rise_classifier")).float(),
                           anchors=torch.from_numpy(store.read(self.path, "anchor_emb"))[:, chosen].float())
