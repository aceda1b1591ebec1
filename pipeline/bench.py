"""`pipeline bench`: measured ratios for the cache's promises, all in one run on one machine.

- extract_efficiency: extraction images/s / the teacher's own images/s on pre-decoded tensors
- cached_step_overhead: cached distill step time / student forward+backward on in-memory tensors
- online_vs_cached: online-teacher step / cached step, against the ideal 1 + t_teacher / t_student
- align_speedup: align steps/s on cached features / align steps/s running student and teacher
- teacher_forwards: ours (one extraction) vs the official code's, for a full leave-one-domain-out
  adip run with the default protocol on the benchmark dataset
- extraction peak memory for N and 2N images (streaming: it must not grow with N)
- data path CPU per training image at 224 px from JPEGs: decode-and-render vs the pixel cache
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data import demo
from data.images import ReplayImages
from cache.teacher_cache import TeacherCache
from pipeline import config
from stages.runfolder import RunFolder
from stages import align as align_stage, distill as distill_stage, stage
from stages.extract import VIEWS, Extract
from stages.pixels import StudentPixels
from stages.methods import BENCH_METHOD, DEFAULT_METHOD, METHODS, Batch
from stages.student import create_backbone, feature_dim
from stages.teacher import teacher_of_cache

TARGETS = {"extract_efficiency": (">=", 0.90), "cached_step_overhead": ("<=", 1.10),
           "online_fraction_of_ideal": (">=", 0.95), "align_speedup": (">=", 100.0),
           "data_ms_per_image_pixel_cache": ("<=", 0.3)}


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


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
                            "device": "cuda" if torch.cuda.is_available() else "cpu",
                            "torch_threads": torch.get_num_threads()}}
    per_class = max(1, images // (len(demo.DOMAINS) * len(demo.CLASSES)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = demo.generate(tmp / "data", per_class=per_class)
        run = RunFolder(tmp / "run")
        with run.writing():
            started = time.perf_counter()
            summary = stage.run(Extract(run, data, teacher=teacher, pretrained=pretrained, views=views,
                                        batch_size=batch_size, workers=workers))
        n_images = summary["images"]
        extract_ips = n_images / summary["seconds"]
        cache = TeacherCache(run.teacher_cache)
        index = run.load_index()
        model = teacher_of_cache(cache.attrs)

        # The teacher alone, on tensors already decoded and preprocessed: images (all K views) per second.
        dataset = ReplayImages(index.root, index.paths, cache.view_params, model.input_spec)
        teacher_pixels = torch.stack([dataset[i][1] for i in range(batch_size * views)])
        t_teacher_batch = _time(lambda: model.encode_images(teacher_pixels), 5)
        results["extract_images_per_s"] = round(extract_ips, 1)
        results["teacher_images_per_s"] = round(batch_size / t_teacher_batch, 1)
        results["extract_efficiency"] = round(extract_ips / (batch_size / t_teacher_batch), 3)

        # One training step: in-memory tensors vs. the cached pipeline vs. the online teacher.
        sources = index.domains[1:]
        train_rows = [index.rows([d], "train") for d in sources]
        val_rows = [index.rows([d], "val")[:3] for d in sources]
        text = cache.text(sources)
        backbone, spec = create_backbone(student, student_weights, student_size)
        step_batch = per_domain * len(sources)

        def new_trainer():
            net, _ = create_backbone(student, student_weights, student_size)
            method = METHODS[BENCH_METHOD]
            return method(method.build(net, feature_dim(net), text), text, steps)

        trainer = new_trainer()
        student_px = torch.stack([ReplayImages(index.root, index.paths, cache.view_params, spec)[i][1]
                                  for i in range(step_batch)])
        batch = Batch(student_px, torch.zeros(step_batch, dtype=torch.long), cache.targets(torch.arange(step_batch)))
        t_student = _time(lambda: trainer.update(batch), 5)
        t_teacher_step = _time(lambda: model.encode_images(teacher_pixels[:step_batch]), 5)

        # The cached step reads the student pixel cache, as `pipeline distill` does by default; the
        # online step decodes and renders each view for the teacher, as the official code does.
        pixel_stage = StudentPixels(run, spec, workers=workers)
        stage.run(pixel_stage, quiet=True)

        def train(online: bool) -> float:
            data = ReplayImages(index.root, index.paths, cache.view_params, spec, teacher_spec=model.input_spec) \
                if online else pixel_stage.dataset()
            _, log = distill_stage.train(new_trainer(), data, cache, index.label, train_rows, val_rows,
                                         steps=steps, per_domain=per_domain, eval_every=steps, workers=workers,
                                         online=distill_stage.OnlineTargets(model) if online else None,
                                         pixel_spec=None if online else spec)
            return log[-1]["train_seconds_per_step"]

        t_cached, t_online = train(False), train(True)
        ideal = 1 + t_teacher_step / t_student
        results.update(student_step_s=round(t_student, 5), cached_step_s=t_cached, online_step_s=t_online,
                       teacher_forward_step_s=round(t_teacher_step, 5),
                       cached_step_overhead=round(t_cached / t_student, 3),
                       online_vs_cached=round(t_online / t_cached, 3), online_vs_cached_ideal=round(ideal, 3),
                       online_fraction_of_ideal=round((t_online / t_cached) / ideal, 3))

        # Align: a linear step on cached features vs. a step that must run student and teacher first.
        features = torch.randn(n_images, views, feature_dim(backbone)).half()
        labels = torch.as_tensor(index.label)
        align_steps = 200
        started = time.perf_counter()
        align_stage.align(features, cache.image_emb, cache.classifier, labels, train_rows,
                          [index.rows([d], "val") for d in sources], steps=align_steps, per_domain=per_domain,
                          eval_every=align_steps)
        cached_align = (time.perf_counter() - started) / align_steps
        frozen = backbone.eval()
        with torch.no_grad():
            t_frozen = _time(lambda: frozen(student_px), 3)
        online_align = t_frozen + t_teacher_step + cached_align
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


def _cpu_ms(fn, n: int) -> float:
    """CPU milliseconds (this process) per unit of ``fn()``, after one warm-up."""
    fn()
    started = time.process_time()
    fn()
    return round((time.process_time() - started) * 1e3 / n, 3)


def _data_path_ms(folder: Path, views: int, n_images: int = 48, size: int = 224) -> dict:
    """CPU per training image at ``size`` px from 500x375 JPEGs (quality 90), in one process:
    decode, render, resize and normalise every step, against reading the pixel cache."""
    from PIL import Image
    from cache import pixel_cache
    from data import pixels
    from data.views import InputSpec, sample_views

    root, rng = folder / "images", np.random.default_rng(0)
    root.mkdir(parents=True)
    paths = [f"img{i:03d}.jpg" for i in range(n_images)]
    for path in paths:  # smooth gradients plus sensor-like noise: a photograph's JPEG cost
        yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
        base = np.stack([xx / 2, yy / 1.5, 128 + 100 * np.sin(xx / 23 + yy / 37)], -1) + rng.normal(0, 8, (375, 500, 3))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(root / path, quality=90)
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


def render(results: dict) -> str:
    lines = ["| figure | measured | target |", "|---|---|---|"]
    for key in ("extract_efficiency", "cached_step_overhead", "online_vs_cached", "online_vs_cached_ideal",
                "online_fraction_of_ideal", "align_speedup", "teacher_forwards", "teacher_forwards_official",
                "extract_peak_mb_n", "extract_peak_mb_2n", "extract_memory_growth", "data_ms_per_image_replay",
                "data_ms_per_image_pixel_cache", "normalise_ms_per_image_on_cpu"):
        target = TARGETS.get(key)
        mark = ""
        if target:
            ok = results[key] >= target[1] if target[0] == ">=" else results[key] <= target[1]
            mark = f"{target[0]} {target[1]} ({'met' if ok else 'missed'})"
        value = f"{results[key]:,}" if isinstance(results[key], int) else str(results[key])
        lines.append(f"| {key} | {value} | {mark} |")
    s = results["settings"]
    lines.append(f"\nteacher {s['teacher'].split('/')[-1]}, student {s['student']} at {s['student_size']} px, "
                 f"{s['images']} images x {s['views']} views, batch {s['batch_size']}, {s['steps']} steps of "
                 f"{s['per_domain']} per domain, {s['workers']} workers, {s['device']}, {s['torch_threads']} threads")
    lines.append(f"teacher {results['teacher_images_per_s']} img/s alone, extraction {results['extract_images_per_s']} "
                 f"img/s; student step {results['student_step_s']} s, cached {results['cached_step_s']} s, "
                 f"online {results['online_step_s']} s")
    return "\n".join(lines)
