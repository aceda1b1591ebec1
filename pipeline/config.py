"""Presets of ``pipeline run`` (and the defaults of the single-stage commands).

Method hyperparameters are not here: each method declares its own, and its demo overrides, in
``stages/methods.py``.
"""
from pathlib import Path

import data
from stages.extract import VIEWS
from stages.methods import ALIGN_DEMO, ALIGN_HPARAMS

DEMO_TEACHER = "local-dir:" + str(Path(data.__file__).parent / "demo_teacher")
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
