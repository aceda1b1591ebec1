"""Presets of ``pipeline run`` (and the defaults of the single-stage commands).

Method defaults are not here: each method declares its own, and its demo overrides, in
``stages/methods.py``. The per-dataset presets below carry the official per-dataset numbers,
keyed by the method class's ``name``.
"""
from pathlib import Path

import data
from stages.extract import VIEWS
from stages.methods import ALIGN_DEMO, ALIGN_HPARAMS, RISE

DEMO_TEACHER = "local-dir:" + str(Path(data.__file__).parent / "demo_teacher")
# The demo's second teacher: the same recipe from another seed (`python -m data.pretrain_teacher
# --seed 4321 --out data/demo_teacher_2`). `--teachers` knows both by their folder names.
DEMO_TEACHERS = {name: "local-dir:" + str(Path(data.__file__).parent / name) for name in ("demo_teacher", "demo_teacher_2")}
# The shipped pre-trained demo student (`python -m data.pretrain_student`): photos only.
DEMO_STUDENT = str(Path(data.__file__).parent / "demo_student" / "test_resnet_photo_shapes.safetensors")

# A user's dataset: the paper's models and the official VL2V schedule.
REAL = {"teacher": "ViT-B-16", "pretrained": "openai", "student": "resnet50",
        "student_weights": "imagenet", "student_size": None, "views": VIEWS,
        "steps": 5001, "align_steps": 5001, "per_domain": 32, "eval_every": 500,
        "align_lr": ALIGN_HPARAMS["lr"], "demo": False}

# `pipeline run` with no arguments: the pre-trained tiny demo teacher and the pre-trained tiny
# demo student (its "ImageNet": photos of shapes) at 32 px, under 10 minutes on 2 CPU cores.
# The schedule is 20x shorter than the papers', so the learning rates are each method's ``demo``
# overrides, chosen on source-domain validation (same optimisers, same losses).
DEMO = {"teacher": DEMO_TEACHER, "pretrained": None, "student": "test_resnet",
        "student_weights": DEMO_STUDENT, "student_size": 32, "views": VIEWS,
        "steps": 250, "align_steps": 1000, "per_domain": 12, "eval_every": 50,
        "align_lr": ALIGN_DEMO["lr"], "demo": True}

DEMO_RUN = Path("runs/demo")


def _rise_grid(rows: list) -> list:
    """RISE's loss-weight grid (its data/hp_search files): rows of (w_kd, w_ce, w_dist), T = 3."""
    return [{"w_kd": kd, "w_ce": ce, "w_dist": dist} for kd, ce, dist in rows]


# VL2V (datasets.py, train_all.py): 5001 steps validated every 200 (DomainNet 15001 / 1000), in
# both stages; 32 images per source domain. RISE (train_rise.py, hp_search): lr 1e-3 (2e-3 on
# TerraIncognita); anchors: source-domain names on PACS and OfficeHome, the generic photo anchors
# on VLCS and TerraIncognita; six loss-weight settings per dataset, swept and selected by source
# validation. RISE has no DomainNet setting: its defaults apply there.
_PACS_GRID = _rise_grid([(0.9, 0.1, 0.5), (0.8, 0.2, 0.5), (0.9, 0.1, 1.0), (0.8, 0.2, 1.0), (0.9, 0.1, 2.0),
                         (0.8, 0.2, 2.0)])
_VL2V = {"steps": 5001, "align_steps": 5001, "eval_every": 200, "per_domain": 32}
PRESETS = {
    "pacs": {**_VL2V, "methods": {RISE.name: {"hparams": {"lr": 1e-3}, "anchors": "domains", "grid": _PACS_GRID}}},
    "vlcs": {**_VL2V, "methods": {RISE.name: {"hparams": {"lr": 1e-3}, "anchors": "generic", "grid": _PACS_GRID}}},
    "officehome": {**_VL2V, "methods": {RISE.name: {
        "hparams": {"lr": 1e-3}, "anchors": "domains",
        "grid": _rise_grid([(0.2, 0.8, 0.5), (0.1, 0.9, 0.5), (0.2, 0.8, 1.0), (0.1, 0.9, 1.0), (0.2, 0.8, 2.0),
                            (0.1, 0.9, 2.0)])}}},
    "terraincognita": {**_VL2V, "methods": {RISE.name: {
        "hparams": {"lr": 2e-3}, "anchors": "generic",
        "grid": _rise_grid([(0.2, 0.8, 0.5), (0.3, 0.7, 0.5), (0.2, 0.8, 1.0), (0.3, 0.7, 1.0), (0.2, 0.8, 2.0),
                            (0.3, 0.7, 2.0)])}}},
    "domainnet": {"steps": 15001, "align_steps": 15001, "eval_every": 1000, "per_domain": 32, "methods": {}},
}


def method_settings(settings: dict, method: str) -> dict:
    """A preset's settings of one method: ``hparams``, ``anchors`` and its sweep ``grid`` (if any)."""
    return settings.get("methods", {}).get(method, {})
