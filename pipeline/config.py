"""Defaults: the published methods' settings, and the built-in demo's small-CPU settings."""
from pathlib import Path

import data

DEMO_TEACHER = "local-dir:" + str(Path(data.__file__).parent / "demo_teacher")

# VL2V-ADiP as in the official code.
ADIP = {"lr": 5e-5, "weight_decay": 0.0, "lam": 0.5, "per_domain": 32, "steps": 5001,
        "align_steps": 5001}

# `pipeline run` with a user's dataset: the paper's models.
REAL = {"teacher": "ViT-B-16", "pretrained": "openai", "student": "resnet50",
        "student_weights": "imagenet", "student_size": None, "views": 8,
        "steps": ADIP["steps"], "align_steps": ADIP["align_steps"], "per_domain": ADIP["per_domain"],
        "eval_every": 500, "align_lr": ADIP["lr"], "lr": {}}

# `pipeline run` with no arguments: the pre-trained tiny demo teacher and a random-init tiny
# student at 32 px, under 10 minutes on 2 CPU cores. The papers' learning rates are for
# fine-tuning ImageNet-pretrained students; a student trained from scratch for 250 steps needs
# larger ones (same optimisers, same losses).
DEMO = {"teacher": DEMO_TEACHER, "pretrained": None, "student": "test_resnet",
        "student_weights": "none", "student_size": 32, "views": 8,
        "steps": 250, "align_steps": 1000, "per_domain": 12, "eval_every": 50,
        "align_lr": 1e-3, "lr": {"erm": 3e-3, "kd": 3e-3, "adip": 3e-3, "sd": 3e-4, "rise": 3e-3}}

DEMO_RUN = Path("runs/demo")
