"""What only a GPU exercises (tests marked ``gpu``, skipped without CUDA): fp16 extraction, bf16 +
channels-last training resumed after kill -9, a one-process torchrun and the pixel reader feeding a fast
step; and, everywhere, the device bench at tiny sizes on the CPU."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache.teacher_cache import TeacherCache
from data.images import ReplayImages
from stages.runfolder import RunFolder
from stages.teacher import OpenClipTeacher

REPO = Path(__file__).resolve().parents[1]
STUDENT = ("--student", "test_resnet", "--student-weights", "none", "--student-size", "32")
OUT = ("distill", "kd", "test_resnet_none_32px", "photo", "seed0")


def gpu(test):
    """Marked ``gpu`` (``pytest -m gpu`` selects them) and skipped where torch sees no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def pipeline(*args, prelude: str = "", **env):
    """``pipeline ARGS`` in a fresh interpreter, after ``prelude`` (Python run first)."""
    code = f"{prelude}\nfrom pipeline.cli import main\nmain({[str(a) for a in args]!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", **env}  # cuBLAS's deterministic mode, for the preludes
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return err


def log_of(run) -> list:
    return [json.loads(line) for line in Path(run).joinpath(*OUT, "log.jsonl").read_text().splitlines()]


@gpu
def test_cached_targets_equal_online_teacher_on_cuda(extracted, teacher_dir):
    # ``extracted`` ran in this process, so on the GPU: the teacher under fp16 autocast
    cache = TeacherCache(extracted / "extract" / "teacher.h5")
    index = RunFolder(extracted).load_index()
    teacher = OpenClipTeacher(f"local-dir:{teacher_dir}", device="cuda")
    dataset = ReplayImages(index.root, index.paths, cache.view_params, teacher.input_spec)
    items = torch.arange(0, len(index.paths) * 3, 7)  # a spread of images and views, in other batches
    pixels = torch.stack([dataset[int(i)][1] for i in items])
    online, cached = teacher.encode_images(pixels), cache.targets(items)
    # Stated tolerance: both are fp16 forwards of unit vectors, in other batch compositions, and the
    # cache rounds to float16: a few half-precision steps (2^-11 near 0.5), nothing more.
    assert torch.allclose(cached, online, atol=4e-3, rtol=0)
    full_precision = OpenClipTeacher(f"local-dir:{teacher_dir}", device="cpu").encode_images(pixels)
    assert torch.nn.functional.cosine_similarity(cached, full_precision).min() > 0.999  # fp16 costs no accuracy


@gpu
def test_training_runs_bf16_and_channels_last_on_cuda(extracted):
    from stages import distill

    method, _ = _student(extracted, "test_resnet", 32)
    model = distill._placed(method, torch.device("cuda"), world=1)
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(4, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    assert method._forward(images).dtype == torch.bfloat16


def _student(run_dir, name: str, size: int):
    """The kd method with student ``name`` (random weights) on the cached texts of the held-out
    'photo', and the student's input spec."""
    from stages.methods import METHODS
    from stages.student import create_backbone, feature_dim

    index, cache = RunFolder(run_dir).load_index(), TeacherCache(Path(run_dir) / "extract" / "teacher.h5")
    net, spec = create_backbone(name, "none", size)
    text = cache.text(index.sources("photo")[0])
    method = METHODS["kd"]
    return method(method.build(net, feature_dim(net), text), text, 100), spec


@gpu
def test_bf16_distill_resumes_after_kill_minus_9_to_the_same_weights(extracted, tmp_path):
    # A high learning rate, so that a resume that lost anything (optimiser moments, the schedule,
    # the batches) ends far from the uninterrupted weights; deterministic kernels, so that an
    # exact resume ends on them bit for bit.
    args = ("--method", "kd", "--holdout", "photo", *STUDENT, "--steps", 300, "--per-domain", 4,
            "--eval-every", 25, "--lr", "1e-2", "--workers", 0)
    deterministic = "import torch; torch.use_deterministic_algorithms(True, warn_only=True)"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for run in (whole, killed):
        shutil.copytree(extracted, run, copy_function=shutil.copy2)
    finished(pipeline("distill", "--run", whole, *args, prelude=deterministic))
    process = pipeline("distill", "--run", killed, *args, prelude=deterministic)
    resume = killed.joinpath(*OUT, "resume.pt")
    deadline = time.time() + 300
    while not resume.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.01)
    assert process.poll() is None, "training ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    finished(pipeline("distill", "--run", killed, *args, prelude=deterministic))
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in log_of(run)[:-1]]
               for run in (whole, killed)]
    assert len(untimed[0]) == 300 // 25 and all(math.isfinite(row["loss"]) for row in untimed[1])
    assert untimed[1] == untimed[0]
    a, b = (load_file(run.joinpath(*OUT, "best.safetensors")) for run in (whole, killed))
    assert a.keys() == b.keys()
    differ = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"resumed weights differ (max abs): {differ}"


@gpu
def test_one_process_torchrun_distill_matches_a_plain_run(extracted, tmp_path):
    # One GPU holds one nccl rank, and at world size 1 the training loop needs no process group:
    # DistributedDataParallel and SyncBatchNorm (converted only at world size > 1) need two GPUs.
    args = ("--method", "kd", "--holdout", "photo", *STUDENT, "--steps", 12, "--per-domain", 4,
            "--eval-every", 4, "--workers", 0)
    plain, launched = tmp_path / "plain", tmp_path / "torchrun"
    for run in (plain, launched):
        shutil.copytree(extracted, run, copy_function=shutil.copy2)
    finished(pipeline("distill", "--run", plain, *args))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "--", "pipeline", "distill",
               "--run", str(launched), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Stated tolerance: the same batches and kernels; bf16 autocast and non-deterministic kernels
    # (atomics in convolution backward) may move the last bits of the running loss.
    for a, b in zip(log_of(plain)[:-1], log_of(launched)[:-1]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2) and b["step"] == a["step"]


@gpu
def test_pixel_reader_keeps_the_gpu_busy(extracted, tmp_path):
    """resnet50 at 224 px, 32 images from each of 3 source domains, reading the pixel cache: the
    step waits for its batch less than 5% of the time."""
    from data.sampling import BalancedViewSampler
    from stages import distill, stage
    from stages.pixels import StudentPixels

    run_dir = tmp_path / "run"
    shutil.copytree(extracted, run_dir, copy_function=shutil.copy2)
    run = RunFolder(run_dir)
    index, cache = run.load_index(), TeacherCache(run.teacher_cache)
    train_rows = index.sources("photo")[1]
    method, spec = _student(run_dir, "resnet50", 224)
    distill._placed(method, torch.device("cuda"), world=1)
    pixels = StudentPixels(run, spec)
    with run.writing():
        stage.run(pixels, quiet=True)
    source = distill.BatchSource(pixels.dataset(), cache, index.label, torch.device("cuda"), pixel_spec=spec)
    batches = source.training(BalancedViewSampler(train_rows, 32, cache.view_params.shape[1], 0, 60))
    waited, total = 0.0, 0.0
    for step in range(60):
        started = time.perf_counter()
        batch = next(batches)
        got = time.perf_counter()
        method.update(batch)  # .item() on the loss: the step has finished on the GPU
        if step >= 10:  # after cuDNN's kernel choice and the reader's start
            waited, total = waited + got - started, total + time.perf_counter() - started
    assert waited / total < 0.05, f"the step waited for data {waited / total:.1%} of the time"


def test_device_bench_at_tiny_sizes_on_the_cpu(tmp_path, teacher_dir):
    """`pipeline bench --device cpu` measures every figure: each a finite positive number."""
    out = tmp_path / "bench.json"
    finished(pipeline("bench", "--device", "cpu", "--teacher", f"local-dir:{teacher_dir}", *STUDENT,
                      "--images", 40, "--views", 2, "--batch-size", 8, "--per-domain", 2, "--steps", 2,
                      "--workers", 0, "--concurrency", "2,4", "--json", out, OMP_NUM_THREADS="1"))
    results = json.loads(out.read_text())
    settings = results.pop("settings")
    assert settings["device"] == "cpu" and settings["concurrency"] == [2, 4]
    expected = {"extract_views_per_s", "extract_images_per_s", "teacher_views_per_s", "extract_efficiency",
                "teacher_gflop_per_view", "teacher_tflop_per_s", "extract_peak_mb", "teacher_peak_mb",
                "student_step_s", "cached_step_s", "online_step_s", "teacher_forward_step_s",
                "cached_step_overhead", "online_vs_cached", "online_vs_cached_ideal", "online_fraction_of_ideal",
                "student_step_peak_mb", "cached_step_peak_mb", "online_step_peak_mb", "serve_views_per_s_c2",
                "serve_vs_local_c2", "serve_views_per_s_c4", "serve_vs_local_c4", "serve_peak_mb"}
    assert set(results) == expected
    bad = {k: v for k, v in results.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    assert not bad
    assert results["extract_images_per_s"] == pytest.approx(results["extract_views_per_s"] / 2, rel=0.01)


def test_device_bench_refuses_bad_input_in_one_line():
    from conftest import invoke
    result = invoke("bench", "--device", "cpu", "--concurrency", "4,x")
    assert result.exit_code == 2 and "--concurrency is a list of positive integers" in result.output
    if not torch.cuda.is_available():
        result = invoke("bench", "--device", "cuda")
        assert result.exit_code == 2 and "no CUDA device is visible" in result.output
