"""Shared fixtures: a tiny open_clip teacher written to disk, a small generated dataset, and one
extracted run folder that tests copy before changing."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network

TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"},
}


def write_tiny_teacher(folder, seed: int = 1):
    """An open_clip local-dir (config + safetensors weights) with seeded random weights."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(seed)
    model = open_clip.create_model("local-dir:" + str(folder))  # no weights yet: random init
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    return write_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    from data import demo
    return demo.generate(tmp_path_factory.mktemp("data") / "shapes", per_class=4)


def invoke(*args):
    from pipeline.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def extracted(tmp_path_factory, teacher_dir, dataset):
    run = tmp_path_factory.mktemp("runs") / "base"
    result = invoke("extract", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                    "--views", 3, "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run_copy(extracted, tmp_path):
    """A private copy of the extracted run folder (mtimes kept, so manifests stay fresh)."""
    target = tmp_path / "run"
    shutil.copytree(extracted, target, copy_function=shutil.copy2)
    return target


ALIGN = ("--student", "test_resnet", "--student-weights", "none", "--student-size", 32,
         "--steps", 20, "--per-domain", 4, "--eval-every", 10, "--workers", 0)
DISTILL = ("--steps", 3, "--per-domain", 2, "--eval-every", 3, "--workers", 0)
