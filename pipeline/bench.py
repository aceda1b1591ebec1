"""`pipeline bench`: measured ratios for the cache's promises, all in one run on one machine.

- extract_efficiency: extraction images/s / the teacher's own images/s on pre-decoded tensors
- cached_step_overhead: cached distill step time / student forward+backward on in-memory tensors
- online_vs_cached: online-teacher step / cached step, against the ideal 1 + t_teacher / t_student
- align_speedup: align steps/s on cached features / align steps/s running student and teacher
- teacher_forwards: ours (one extraction) vs the official code's, for a full leave-one-domain-out
  adip run with the default protocol on the benchmark dataset
- extraction peak memory for N and 2N images (streaming: it must not grow with N)
- data path CPU per training image at 224 px from JPEGs: decode-and-render vs the pixel cache

``device_bench`` (``pipeline bench --device cuda|cpu``) measures the same promises at the papers'
sizes on one device, in absolute numbers: extraction of 500x375 JPEGs against the teacher on
tensors already on the device (and its TFLOP/s), the cached distill step against the student's
own step, the online-teacher step, the served teacher at two concurrencies, and the peak memory
of each.
"""
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from data import demo
from data.images import ReplayImages
from cache.errors import UserError
from cache.teacher_cache import TeacherCache
from pipeline import config
from stages.runfolder import RunFolder
from stages import align as align_stage, distill as distill_stage, stage
from stages.extract import VIEWS, Extract
from stages.pixels import StudentPixels
from stages.methods import BENCH_METHOD, DEFAULT_METHOD, METHODS, Batch
from stages.runtime import device as run_device
from stages.student import create_backbone, feature_dim
from stages.teacher import teacher_of_cache

PRESET = {"teacher": config.DEMO_TEACHER, "pretrained": None, "student": "test_resnet", "student_weights": "none",
          "student_size": 64, "images": 400, "views": 4, "batch_size": 32, "per_domain": 16, "steps": 40,
          "workers": min(4, os.cpu_count() or 1)}
# ``--device``: the papers' models and sizes, random weights (nothing is downloaded)
DEVICE_PRESET = {"teacher": "ViT-B-16", "pretrained": None, "student": "resnet50", "student_weights": "none",
                 "student_size": 224, "images": 4000, "views": 8, "batch_size": 64, "per_domain": 32, "steps": 50,
                 "workers": os.cpu_count() or 1, "concurrency": (4, 16)}

TARGETS = {"extract_efficiency": (">=", 0.90), "cached_step_overhead": ("<=", 1.10),
           "online_fraction_of_ideal": (">=", 0.95), "align_speedup": (">=", 100.0),
           "data_ms_per_image_pixel_cache": ("<=", 0.3),
           # one H200 with ViT-B-16 at 224 px (about 45% of its bf16 peak), 8 views per image
           "teacher_views_per_s": (">=", 10_000), "extract_images_per_s": (">=", 1_250)}


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up (until the GPU is done)."""
    fn()
    _synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _peak_rss_mb(data, run, teacher, pretrained, views, batch_size, workers) -> float:
    """Peak resident memory (MB) of a fresh extraction process and its workers."""
    script = ("import resource, sys\nfrom pipeline.cli import main\n"
              "try:\n    main(sys.argv[1:], standalone_mode=False)\nfinally:\n"
              "    self, kids = (resource.getrusage(w).ru_maxrss for w in "
              "(resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
              "    print('PEAK', self, kids, file=sys.stderr)\n")
    command = [sys.executable, "-c", script, "extract", "--data", str(data), "--run", str(run),
               "--teacher", teacher, "--pretrained", str(pretrained), "--views", str(views),
               "--batch-size", str(batch_size), "--workers", str(workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    peak = [line for line in result.stderr.splitlines() if line.startswith("PEAK")][-1].split()
    return round(max(int(peak[1]), int(peak[2])) / 1024, 1)


def bench(*, teacher: str, pretrained, student: str, student_weights: str, student_size: int,
          images: int, views: int, batch_size: int, per_domain: int, steps: int, workers: int) -> dict:
    torch.manual_seed(0)
    results = {"settings": {"teacher": teacher, "student": student, "student_size": student_size,
                            "images": images, "views": views, "batch_size": batch_size,
                            "per_domain": per_domain, "steps": steps, "workers": workers,
                            "device": run_device().type, "torch_threads": torch.get_num_threads()}}
    per_class = max(1, images // (len(demo.DOMAINS) * len(demo.CLASSES)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = demo.generate(tmp / "data", per_class=per_class)
        run = RunFolder(tmp / "run")
        summary = _extract(run, data, teacher, pretrained, views, batch_size, workers)
        n_images = summary["images"]
        extract_ips = n_images / summary["seconds"]
        cache, index = TeacherCache(run.teacher_cache), run.load_index()
        model = teacher_of_cache(cache.attrs)
        teacher_pixels = _teacher_pixels(index, cache, model, batch_size * views)
        t_teacher_batch = _time(lambda: model.encode_images(teacher_pixels), 5)
        results["extract_images_per_s"] = round(extract_ips, 1)
        results["teacher_images_per_s"] = round(batch_size / t_teacher_batch, 1)
        results["extract_efficiency"] = round(extract_ips / (batch_size / t_teacher_batch), 3)
        steps_timed = _training_steps(run, index, cache, model, teacher_pixels, student=student,
                                      student_weights=student_weights, student_size=student_size,
                                      per_domain=per_domain, steps=steps, workers=workers)
        results.update({k: v for k, v in steps_timed.items() if not k.endswith("_peak_mb")})

        # Align: a linear step on cached features vs. a step that must run student and teacher first.
        sources = index.domains[1:]
        backbone, spec = create_backbone(student, student_weights, student_size)
        features = torch.randn(n_images, views, feature_dim(backbone)).half()
        labels = torch.as_tensor(index.label)
        align_steps = 200
        started = time.perf_counter()
        align_stage.align(features, cache.image_emb, cache.classifier, labels,
                          [index.rows([d], "train") for d in sources], [index.rows([d], "val") for d in sources],
                          steps=align_steps, per_domain=per_domain, eval_every=align_steps)
        cached_align = (time.perf_counter() - started) / align_steps
        frozen = backbone.eval()
        student_px = _replayed(index, cache, spec, per_domain * len(sources))
        with torch.no_grad():
            t_frozen = _time(lambda: frozen(student_px), 3)
        online_align = t_frozen + steps_timed["teacher_forward_step_s"] + cached_align
        results.update(align_cached_step_s=round(cached_align, 6), align_online_step_s=round(online_align, 5),
                       align_speedup=round(online_align / cached_align, 1))

        # Teacher forwards for a full leave-one-domain-out run of the default method, default protocol.
        n_domains, real = len(index.domains), config.REAL
        official = n_domains * METHODS[DEFAULT_METHOD].official_teacher_forwards(
            steps=real["steps"], align_steps=real["align_steps"], batch=real["per_domain"] * (n_domains - 1))
        results.update(teacher_forwards=n_images * VIEWS, teacher_forwards_official=official,
                       teacher_forwards_note=f"{n_images} images x {VIEWS} views, once; official: {n_domains} "
                                             f"held-out domains x ({real['align_steps']} align + {real['steps']} "
                                             f"distill steps) x {real['per_domain']} x {n_domains - 1}")

        # Streaming: peak memory of extraction for N and 2N images.
        big = demo.generate(tmp / "data2", per_class=2 * per_class)
        peak_n = _peak_rss_mb(data, tmp / "mem1", teacher, pretrained, views, batch_size, workers)
        peak_2n = _peak_rss_mb(big, tmp / "mem2", teacher, pretrained, views, batch_size, workers)
        results.update(extract_peak_mb_n=peak_n, extract_peak_mb_2n=peak_2n,
                       extract_memory_growth=round(peak_2n / peak_n, 3))
        results.update(_data_path_ms(tmp / "jpeg", views))
    return results


def _extract(run, data, teacher, pretrained, views, batch_size, workers) -> dict:
    with run.writing():
        return stage.run(Extract(run, data, teacher=teacher, pretrained=pretrained, views=views,
                                 batch_size=batch_size, workers=workers))


def _replayed(index, cache, spec, n: int, **kw) -> torch.Tensor:
    """The first ``n`` recorded views preprocessed at ``spec``, stacked."""
    dataset = ReplayImages(index.root, index.paths, cache.view_params, spec, **kw)
    return torch.stack([dataset[i][1] for i in range(n)])


def _teacher_pixels(index, cache, model, n: int) -> torch.Tensor:
    """``n`` views decoded and preprocessed for the teacher, already on its device."""
    return _replayed(index, cache, model.input_spec, n).to(model.device)


def _training_steps(run, index, cache, model, teacher_pixels, *, student, student_weights, student_size,
                    per_domain, steps, workers) -> dict:
    """One training step on the training device: the student's own forward and backward on tensors
    already there, the cached step reading the pixel cache (as `pipeline distill` does by default)
    and the online step that decodes and renders each view for the teacher (as the official code),
    with the peak memory of each."""
    sources = index.domains[1:]
    train_rows = [index.rows([d], "train") for d in sources]
    val_rows = [index.rows([d], "val")[:3] for d in sources]
    text = cache.text(sources)
    where = run_device()

    def new_trainer():
        net, _ = create_backbone(student, student_weights, student_size)
        method = METHODS[BENCH_METHOD]
        return method(method.build(net, feature_dim(net), text), text, steps)

    _, spec = create_backbone(student, student_weights, student_size)
    step_batch = per_domain * len(sources)
    trainer = new_trainer()
    distill_stage._placed(trainer, where, world=1)  # on the device, channels-last on CUDA, as training
    student_px = _replayed(index, cache, spec, step_batch).to(where)
    if where.type == "cuda":
        student_px = student_px.contiguous(memory_format=torch.channels_last)
    batch = Batch(student_px, torch.zeros(step_batch, dtype=torch.long, device=where),
                  cache.targets(torch.arange(step_batch)).to(where))
    with _Peak() as student_peak:
        t_student = _time(lambda: trainer.update(batch), 5)
    t_teacher_step = _time(lambda: model.encode_images(teacher_pixels[:step_batch]), 5)
    pixel_stage = StudentPixels(run, spec, workers=workers)
    stage.run(pixel_stage, quiet=True)

    def train(online: bool, n_steps: int = steps) -> float:
        data = ReplayImages(index.root, index.paths, cache.view_params, spec, teacher_spec=model.input_spec) \
            if online else pixel_stage.dataset()
        _, log = distill_stage.train(new_trainer(), data, cache, index.label, train_rows, val_rows,
                                     steps=n_steps, per_domain=per_domain, eval_every=n_steps, workers=workers,
                                     online=distill_stage.OnlineTargets(model) if online else None,
                                     pixel_spec=None if online else spec)
        return log[-1]["train_seconds_per_step"]

    train(False, n_steps=min(steps, 3))  # the first steps pay for kernel selection and the reader's start
    with _Peak() as cached_peak:
        t_cached = train(False)
    with _Peak() as online_peak:
        t_online = train(True)
    ideal = 1 + t_teacher_step / t_student
    return {"student_step_s": round(t_student, 5), "cached_step_s": t_cached, "online_step_s": t_online,
            "teacher_forward_step_s": round(t_teacher_step, 5),
            "cached_step_overhead": round(t_cached / t_student, 3),
            "online_vs_cached": round(t_online / t_cached, 3), "online_vs_cached_ideal": round(ideal, 3),
            "online_fraction_of_ideal": round((t_online / t_cached) / ideal, 3),
            "student_step_peak_mb": student_peak.mb, "cached_step_peak_mb": cached_peak.mb,
            "online_step_peak_mb": online_peak.mb}


class _Peak:
    """Peak memory (MB) of what runs inside: the GPU's allocations on CUDA, else this process's
    resident set (sampled)."""

    def __enter__(self):
        self.cuda = run_device().type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.sampler = _Sampler(_resident_bytes)
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        else:
            self.mb = self.sampler.peak_mb()


class _Sampler:
    """The peak of ``read()`` (bytes), sampled every 20 ms from now until ``peak_mb``, above ``baseline``."""

    def __init__(self, read, baseline: int = 0):
        self.read, self.baseline, self.peak = read, baseline, read()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.read())
            except OSError:  # the process measured has ended
                return

    def peak_mb(self) -> float:
        self.stop.set()
        self.thread.join()
        return round((self.peak - self.baseline) / 2**20, 1)


def _resident_bytes(pid="self") -> int:
    """A process's resident set now (Linux)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_ms(fn, n: int) -> float:
    """CPU milliseconds (this process) per unit of ``fn()``, after one warm-up."""
    fn()
    started = time.process_time()
    fn()
    return round((time.process_time() - started) * 1e3 / n, 3)


def _write_photo(path: Path, rng: np.random.Generator) -> None:
    """A 500x375 JPEG (quality 90) of smooth gradients plus sensor-like noise: a photograph's JPEG cost."""
    from PIL import Image
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    base = np.stack([xx / 2, yy / 1.5, 128 + 100 * np.sin(xx / 23 + yy / 37)], -1) + rng.normal(0, 8, (375, 500, 3))
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=90)


def _data_path_ms(folder: Path, views: int, n_images: int = 48, size: int = 224) -> dict:
    """CPU per training image at ``size`` px from 500x375 JPEGs (quality 90), in one process:
    decode, render, resize and normalise every step, against reading the pixel cache."""
    from cache import pixel_cache
    from data import pixels
    from data.views import InputSpec, sample_views

    root, rng = folder / "images", np.random.default_rng(0)
    root.mkdir(parents=True)
    paths = [f"img{i:03d}.jpg" for i in range(n_images)]
    for path in paths:
        _write_photo(root / path, rng)
    spec = InputSpec(size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    params = np.stack([sample_views(p, 500, 375, views, seed=0) for p in paths])
    items = np.arange(n_images) * views + rng.integers(1, max(views, 2), n_images) % views
    replay = ReplayImages(root, paths, params, spec)
    pixels.build(folder / "pixels.h5", root, paths, params, spec, source=pixel_cache.source_identity(params, "bench"))
    cached = pixels.PixelImages(folder / "pixels.h5")
    batches = [items[i:i + 16].tolist() for i in range(0, n_images, 16)]
    read = _cpu_ms(lambda: [None for _ in pixels.PixelBatches(cached, batches)], n_images)
    batch = torch.from_numpy(cached.reader.read(items[:16] // views, items[:16] % views))
    return {"data_ms_per_image_replay": _cpu_ms(lambda: [replay[int(i)] for i in items], n_images),
            "data_ms_per_image_pixel_cache": read,
            "normalise_ms_per_image_on_cpu": _cpu_ms(lambda: pixels.normalise(batch, spec), len(batch))}


def use_device(name: str) -> None:
    """Run on ``name`` ('cuda' or 'cpu'): 'cpu' hides the GPUs from this process and those it starts,
    before anything touches CUDA; 'cuda' without a visible GPU is refused."""
    if name == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch here; use --device cpu")


def device_bench(*, teacher: str, pretrained, student: str, student_weights: str, student_size: int, images: int,
                 views: int, batch_size: int, per_domain: int, steps: int, workers: int,
                 concurrency: tuple = (4, 16)) -> dict:
    """The papers' workload on this process's device, in absolute numbers (``DEVICE_PRESET``)."""
    torch.manual_seed(0)
    where = run_device()
    results = {"settings": {"teacher": teacher, "student": student, "student_size": student_size,
                            "images": images, "views": views, "batch_size": batch_size, "per_domain": per_domain,
                            "steps": steps, "workers": workers, "concurrency": list(concurrency),
                            "device": torch.cuda.get_device_name() if where.type == "cuda" else "cpu",
                            "teacher_autocast": "float16" if where.type == "cuda" else "off (float32)",
                            "student_autocast": "bfloat16, channels-last" if where.type == "cuda" else "off (float32)",
                            "memory": "torch.cuda.max_memory_allocated; serving: the GPU's memory in use (NVML, "
                                      "sampled every 20 ms) above its level before the server started"
                                      if where.type == "cuda" else
                                      "resident set of the process (the server's when serving), sampled every 20 ms"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _photo_dataset(tmp / "photos", images, workers)
        run = RunFolder(tmp / "run")
        with _Peak() as peak:
            summary = _extract(run, data, teacher, pretrained, views, batch_size, workers)
        cache, index = TeacherCache(run.teacher_cache), run.load_index()
        model = teacher_of_cache(cache.attrs)
        teacher_pixels = _teacher_pixels(index, cache, model, batch_size * views)
        with _Peak() as teacher_peak:
            t_teacher_batch = _time(lambda: model.encode_images(teacher_pixels), 5)
        extract_vps = summary["images"] * views / summary["seconds"]
        teacher_vps = len(teacher_pixels) / t_teacher_batch
        flops = _flops_per_view(model, teacher_pixels[:1])
        results.update(extract_views_per_s=round(extract_vps, 1), extract_images_per_s=round(extract_vps / views, 1),
                       teacher_views_per_s=round(teacher_vps, 1),
                       extract_efficiency=round(extract_vps / teacher_vps, 3),
                       teacher_gflop_per_view=float(f"{flops / 1e9:.4g}"),
                       teacher_tflop_per_s=float(f"{flops * teacher_vps / 1e12:.4g}"),
                       extract_peak_mb=peak.mb, teacher_peak_mb=teacher_peak.mb)
        results.update(_training_steps(run, index, cache, model, teacher_pixels, student=student,
                                       student_weights=student_weights, student_size=student_size,
                                       per_domain=per_domain, steps=steps, workers=workers))
        try:
            served = _serve_views_per_s(index, cache, teacher, pretrained, where.type, concurrency,
                                        n_views=min(len(index) * views, 16 * batch_size))
        except (RuntimeError, ImportError) as e:  # no server, or no NVML: the figures above are kept
            results["serve_error"] = str(e)
            return results
        for c, views_per_s in served["views_per_s"].items():
            results[f"serve_views_per_s_c{c}"] = views_per_s
            results[f"serve_vs_local_c{c}"] = round(views_per_s / extract_vps, 3)
        results["serve_peak_mb"] = served["peak_mb"]
    return results


def _photo_dataset(root: Path, n_images: int, workers: int) -> Path:
    """A DomainBed folder of ``n_images`` real-size JPEGs over the demo's domains and classes."""
    folders = [root / d / c for d in demo.DOMAINS for c in demo.CLASSES]
    paths = [folders[i % len(folders)] / f"img{i:05d}.jpg" for i in range(max(n_images, len(folders)))]
    for folder in folders:
        folder.mkdir(parents=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # numpy and JPEG encoding release the GIL
        list(pool.map(lambda i: _write_photo(paths[i], np.random.default_rng(i)), range(len(paths))))
    return root


def _flops_per_view(model, one_view: torch.Tensor) -> float:
    """Floating-point operations of the teacher's image tower on one view (matrix products and
    attention, as torch's FLOP counter counts them). Counted with gradients on: without them,
    attention takes a fused kernel the counter does not see."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter, torch.enable_grad():
        model.model.encode_image(one_view)
    return float(counter.get_total_flops())


def _serve_views_per_s(index, cache, teacher, pretrained, device: str, concurrency, n_views: int) -> dict:
    """`pipeline serve-teacher` on loopback: views per second through the Open Inference Protocol at
    each concurrency (views rendered beforehand; the client's PNG encoding, HTTP and the server's
    decoding and forward timed, as `extract --teacher URL` spends them), and the server's peak memory."""
    import httpx
    from stages.remote_teacher import RemoteTeacher

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pipeline", "serve-teacher", "--teacher", teacher, "--port", str(port),
               "--device", device, *(["--pretrained", str(pretrained)] if pretrained else [])]
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TEACHER_TOKEN"}  # no token on loopback
    gpu_used = torch.cuda.device_memory_used if device == "cuda" else None  # NVML (nvidia-ml-py): every process
    baseline = gpu_used() if gpu_used else 0
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=Path(__file__).resolve().parents[1])
        used = _Sampler(gpu_used or (lambda: _resident_bytes(server.pid)), baseline)
        try:
            deadline = time.time() + 120
            while True:
                if server.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"serve-teacher exited: {log.read().decode(errors='replace')[-2000:]}")
                try:
                    if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("serve-teacher did not become ready within 120 s")
                time.sleep(0.2)
            rates, pixels = {}, None
            for c in concurrency:
                remote = RemoteTeacher(url, concurrency=c)
                if pixels is None:  # rendered here at the served teacher's size, as `extract --teacher URL`
                    pixels = _replayed(index, cache, remote.input_spec, n_views)
                remote.encode_images(pixels[:remote.request_size * c])  # warm-up: connections, kernels
                started = time.perf_counter()
                remote.encode_images(pixels)
                rates[c] = round(n_views / (time.perf_counter() - started), 1)
                remote.close()
            peak = used.peak_mb()
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return {"views_per_s": rates, "peak_mb": peak}


def render(results: dict) -> str:
    lines = _table(results, ("extract_efficiency", "cached_step_overhead", "online_vs_cached", "online_vs_cached_ideal",
                             "online_fraction_of_ideal", "align_speedup", "teacher_forwards",
                             "teacher_forwards_official", "extract_peak_mb_n", "extract_peak_mb_2n",
                             "extract_memory_growth", "data_ms_per_image_replay", "data_ms_per_image_pixel_cache",
                             "normalise_ms_per_image_on_cpu"))
    s = results["settings"]
    lines.append(f"\nteacher {s['teacher'].split('/')[-1]}, student {s['student']} at {s['student_size']} px, "
                 f"{s['images']} images x {s['views']} views, batch {s['batch_size']}, {s['steps']} steps of "
                 f"{s['per_domain']} per domain, {s['workers']} workers, {s['device']}, {s['torch_threads']} threads")
    lines.append(f"teacher {results['teacher_images_per_s']} img/s alone, extraction {results['extract_images_per_s']} "
                 f"img/s; student step {results['student_step_s']} s, cached {results['cached_step_s']} s, "
                 f"online {results['online_step_s']} s")
    return "\n".join(lines)


def render_device(results: dict) -> str:
    lines = _table(results, [k for k in results if k != "settings"])
    s = results["settings"]
    lines.append(f"\n{s['device']}: teacher {s['teacher'].split('/')[-1]} (autocast {s['teacher_autocast']}), "
                 f"student {s['student']} at {s['student_size']} px (autocast {s['student_autocast']}), "
                 f"{s['images']} images x {s['views']} views, batch {s['batch_size']}, {s['steps']} steps of "
                 f"{s['per_domain']} per domain, {s['workers']} workers; memory: {s['memory']}")
    return "\n".join(lines)


def _table(results: dict, keys) -> list:
    lines = ["| figure | measured | target |", "|---|---|---|"]
    for key in keys:
        target = TARGETS.get(key)
        mark = ""
        if target:
            ok = results[key] >= target[1] if target[0] == ">=" else results[key] <= target[1]
            mark = f"{target[0]} {target[1]:,} ({'met' if ok else 'missed'})"
        value = f"{results[key]:,}" if isinstance(results[key], int) else str(results[key])
        lines.append(f"| {key} | {value} | {mark} |")
    return lines
