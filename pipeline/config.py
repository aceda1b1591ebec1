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
        "eval_every": 500}

# `pipeline run` with no arguments: tiny models at 64 px, a few minutes on 2 CPU cores.
DEMO = {"teacher": DEMO_TEACHER, "pretrained": None, "student": "test_resnet",
        "student_weights": "none", "student_size": 64, "views": 8,
        "steps": 150, "align_steps": 1000, "per_domain": 16, "eval_every": 50}

DEMO_RUN = Path("runs/demo")
