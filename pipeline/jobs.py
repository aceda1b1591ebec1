"""Stage order and bookkeeping: each job checks its inputs, skips fresh work, runs one stage
and records a manifest. The click commands in ``cli.py`` are thin wrappers around these.
"""
import json
import shutil
import time

import click
import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model

from cache import store
from cache.index import write_table
from data import domainbed
from data.images import ReplayImages
from data.views import Augment
from pipeline import manifest
from pipeline.config import ADIP
from pipeline.errors import UserError
from pipeline.runfolder import RunFolder
from stages import align as align_stage
from stages import distill as distill_stage
from stages import evaluate as evaluate_stage
from stages import extract as extract_stage
from stages.methods import METHODS, ProjectedStudent
from stages.predict import device
from stages.prompts import templates as template_set_named
from stages.student import create_backbone, feature_dim, student_key

CACHE_ONLY_METHODS = ("zeroshot",)  # evaluated from the teacher cache, no student


def say(message: str) -> None:
    click.echo(message, err=True)


def _write_json(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_jsonl(path, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _teacher_input(run: RunFolder) -> dict:
    """The extracted cache as an input fingerprint for later stages."""
    digest = manifest.output_hash(run.root, run.rel(run.teacher_store))
    if digest is None:
        raise UserError(f"{run.root} has no finished extraction; run `pipeline extract --data ROOT "
                        f"--run {run.root}` first")
    return {run.rel(run.teacher_store): digest}


def extract(run: RunFolder, data_root, *, teacher: str, pretrained, views: int, view_seed: int,
            template_set: str, val_fraction: float, split_seed: int, batch_size: int,
            workers: int, force: bool) -> None:
    from stages.teacher import OpenClipTeacher

    if views < 1:
        raise UserError(f"--views must be at least 1, got {views}")
    templates = template_set_named(template_set)
    index = domainbed.scan(data_root, val_fraction, split_seed)
    augment = Augment()
    config = {"teacher": teacher, "pretrained": pretrained, "views": views, "view_seed": view_seed,
              "templates": template_set, "val_fraction": val_fraction, "split_seed": split_seed,
              "augment": augment.to_dict()}
    inputs = {"dataset": index.fingerprint}
    reason = manifest.why_stale(run.extract, config, inputs)
    if reason is None and not force:
        say(f"extract: up to date ({len(index)} images, {views} views, teacher {teacher}); --force recomputes")
        return
    model = OpenClipTeacher(teacher, pretrained, device="cuda" if torch.cuda.is_available() else "cpu")
    if not model.has_weights:
        say(f"warning: teacher {teacher} has no weights: using a random initialisation")
    wanted = extract_stage.store_attrs(model, index, templates, template_set, views, view_seed, augment)
    if run.teacher_store.exists() and not force:
        existing = store.read_attrs(run.teacher_store)
        differs = extract_stage.mismatches(existing, wanted)
        if differs:
            detail = "; ".join(f"{k}: cached {_short(existing.get(k))}, now {_short(wanted.get(k))}" for k in differs)
            raise UserError(f"{run.root} holds a cache made with a different {', '.join(differs)} ({detail}); "
                            f"use --force to rebuild it, or a new --run folder")
        say(f"extract: resuming the cache in {run.extract}")
    elif force and run.extract.exists():
        shutil.rmtree(run.extract)
    run.extract.mkdir(parents=True, exist_ok=True)
    say(f"extract: {len(index)} images in {len(index.domains)} domains, {len(index.classes)} classes; "
        f"{views} views each; teacher {teacher}")
    summary = extract_stage.extract(index, model, run.teacher_store, templates=templates,
                                    template_set=template_set, n_views=views, view_seed=view_seed,
                                    augment=augment, batch_size=batch_size, workers=workers)
    status = store.read(run.teacher_store, "status")
    reasons = extract_stage.skipped_reasons(run.teacher_store)
    index.status = ["ok" if s == store.DONE else reasons.get(p, "skipped") for s, p in zip(status, index.paths)]
    write_table(run.index_path, *index.to_columns())
    if summary["ok"] == 0:
        raise UserError(f"none of the {len(index)} images in {data_root} could be read; "
                        f"reasons in {run.extract / 'skipped.jsonl'}")
    manifest.write(run.extract, config, inputs, ["teacher.h5", "index.parquet"], summary)
    rate = f" ({summary['images_per_s']} images/s)" if summary["images_per_s"] else ""
    say(f"extract: done in {summary['seconds']} s{rate}; {summary['ok']} images cached")
    if summary["skipped"]:
        say(f"extract: skipped {summary['skipped']} unreadable images; list in {run.extract / 'skipped.jsonl'}")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def align(run: RunFolder, *, student: str, student_weights: str, student_size, holdout: str,
          steps: int, per_domain: int, lr: float, lam: float, seed: int, eval_every: int,
          batch_size: int, workers: int, force: bool) -> str:
    """Cache the frozen student's features (once per student) and align for ``holdout``."""
    _check_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
    index = run.load_index()
    sources = index.check_holdout(holdout)
    teacher_input = _teacher_input(run)
    key = student_key(student, student_weights, student_size)
    features_dir = run.features(key)
    features_path = features_dir / "features.h5"
    features_config = {"student": student, "student_weights": student_weights, "student_size": student_size}
    reason = manifest.why_stale(features_dir, features_config, teacher_input)
    if reason is not None or force:
        backbone, spec = create_backbone(student, student_weights, student_size)
        features_dir.mkdir(parents=True, exist_ok=True)
        view_params = store.read(run.teacher_store, "view_params")
        say(f"align: caching frozen {student} features of {len(index.rows())} images x {view_params.shape[1]} views")
        summary = align_stage.cache_student_features(
            backbone, spec, index, view_params, index.rows(), features_path, batch_size, workers,
            attrs={"student": student, "student_weights": student_weights, "input_spec": spec.to_dict()})
        _write_json(features_dir / "student.json", {"student": student, "student_weights": student_weights,
                                                    "student_size": student_size, "input_spec": spec.to_dict(),
                                                    "dim": summary["dim"]})
        manifest.write(features_dir, features_config, teacher_input, ["features.h5", "student.json"], summary)
    out = run.align(key, holdout)
    config = {"steps": steps, "per_domain": per_domain, "lr": lr, "lam": lam, "seed": seed,
              "eval_every": eval_every, "weight_decay": ADIP["weight_decay"]}
    inputs = {**teacher_input, run.rel(features_path): manifest.output_hash(run.root, run.rel(features_path))}
    if manifest.why_stale(out, config, inputs) is None and not force:
        say(f"align: up to date for held-out '{holdout}' ({key}); --force recomputes")
        return key
    cache = extract_stage.TeacherCache(run.teacher_store)
    features = torch.from_numpy(store.read(features_path, "features"))
    labels = torch.as_tensor(index.label)
    train_rows = [index.rows([d], domainbed.TRAIN) for d in sources]
    started = time.time()
    state, log = align_stage.align(features, cache.image_emb, cache.classifier, labels, train_rows,
                                   index.rows(sources, domainbed.VAL), steps=steps, per_domain=per_domain,
                                   lr=lr, weight_decay=ADIP["weight_decay"], lam=lam, seed=seed,
                                   eval_every=eval_every)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "projection.safetensors")
    _write_json(out / "config.json", {**config, "holdout": holdout, "sources": sources, "student_key": key})
    _write_jsonl(out / "log.jsonl", log)
    summary = {**log[-1], "seconds": round(time.time() - started, 2)}
    manifest.write(out, config, inputs, ["projection.safetensors", "config.json"], summary)
    say(f"align: held-out '{holdout}': best source-val accuracy {summary['best_source_val_acc']:.3f} "
        f"at step {summary['best_step']} ({summary['seconds']} s)")
    return key


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _build_student(run: RunFolder, key: str, classifier: torch.Tensor, projection_path=None):
    info = json.loads((run.features(key) / "student.json").read_text())
    backbone, spec = create_backbone(info["student"], info["student_weights"], info["student_size"])
    model = ProjectedStudent(backbone, feature_dim(backbone), classifier)
    if projection_path is not None:
        load_model(model.projection, projection_path)
    return model, spec, info


def distill(run: RunFolder, *, method: str, holdout: str, student: str | None, steps: int,
            per_domain: int, lr: float, lam: float, seed: int, eval_every: int, workers: int,
            force: bool) -> str:
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' for distill; choose from {', '.join(METHODS)}")
    _check_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
    index = run.load_index()
    sources = index.check_holdout(holdout)
    key = run.resolve_student(holdout, student)
    projection_path = run.align(key, holdout) / "projection.safetensors"
    inputs = {**_teacher_input(run), run.rel(projection_path): manifest.output_hash(run.root, run.rel(projection_path))}
    config = {"method": method, "steps": steps, "per_domain": per_domain, "lr": lr, "lam": lam,
              "seed": seed, "eval_every": eval_every, "weight_decay": ADIP["weight_decay"]}
    out = run.distill(method, key, holdout, seed)
    if manifest.why_stale(out, config, inputs) is None and not force:
        say(f"distill: {method} up to date for held-out '{holdout}' ({key}, seed {seed}); --force recomputes")
        return key
    cache = extract_stage.TeacherCache(run.teacher_store)
    model, spec, info = _build_student(run, key, cache.classifier, projection_path)
    trainer = METHODS[method](model, lr=lr, weight_decay=ADIP["weight_decay"], lam=lam)
    dataset = ReplayImages(index.root, index.paths, cache.view_params, spec)
    say(f"distill: {method}, {info['student']} on {', '.join(sources)} -> held-out '{holdout}', "
        f"{steps} steps of {per_domain} images per domain")
    started = time.time()
    state, log = distill_stage.distill(
        trainer, dataset, cache, index.label, [index.rows([d], domainbed.TRAIN) for d in sources],
        index.rows(sources, domainbed.VAL), steps=steps, per_domain=per_domain, seed=seed,
        eval_every=eval_every, workers=workers)
    out.mkdir(parents=True, exist_ok=True)
    model.load_state_dict(state)
    save_model(model, str(out / "model.safetensors"))
    _write_json(out / "config.json", {**config, "holdout": holdout, "sources": sources, "student_key": key,
                                      "student": info})
    _write_jsonl(out / "log.jsonl", log)
    summary = {**log[-1], "seconds": round(time.time() - started, 1)}
    manifest.write(out, config, inputs, ["model.safetensors", "config.json"], summary)
    say(f"distill: held-out '{holdout}': best source-val accuracy {summary['best_source_val_acc']:.3f} "
        f"at step {summary['best_step']} ({summary['seconds']} s)")
    return key


def evaluate(run: RunFolder, *, method: str, holdout: str, student: str | None, seed: int,
             workers: int, force: bool = False) -> dict:
    """Score one trained model (or the cached teacher) and append the result to results.jsonl."""
    if method not in METHODS and method not in CACHE_ONLY_METHODS:
        raise UserError(f"unknown method '{method}'; choose from {', '.join([*METHODS, *CACHE_ONLY_METHODS])}")
    index = run.load_index()
    index.check_holdout(holdout)
    teacher_input = _teacher_input(run)
    cache_attrs = store.read_attrs(run.teacher_store)
    if method in CACHE_ONLY_METHODS:
        key, inputs = "teacher", teacher_input
    else:
        key = run.resolve_student(holdout, student)
        model_path = run.distill(method, key, holdout, seed) / "model.safetensors"
        digest = manifest.output_hash(run.root, run.rel(model_path))
        if digest is None:
            raise UserError(f"no trained {method} model for held-out '{holdout}' (seed {seed}); run "
                            f"`pipeline distill --run {run.root} --method {method} --holdout {holdout}` first")
        inputs = {**teacher_input, run.rel(model_path): digest}
    out = run.evaluate(method, key, holdout, seed)
    if manifest.why_stale(out, {}, inputs) is None and not force:
        return json.loads((out / "metrics.json").read_text())
    cache = extract_stage.TeacherCache(run.teacher_store)
    if method in CACHE_ONLY_METHODS:
        metrics = evaluate_stage.evaluate_zeroshot(cache, index, holdout)
    else:
        model, spec, _ = _build_student(run, key, cache.classifier)
        load_model(model, str(model_path))
        model.eval()
        dataset = ReplayImages(index.root, index.paths, cache.view_params, spec)
        with torch.inference_mode():
            metrics = evaluate_stage.evaluate_student(model.to(device()).predict, dataset,
                                                      index, holdout, workers)
    result = {"method": method, "student": key, "teacher": cache_attrs["teacher"],
              "pretrained": cache_attrs["pretrained"], "holdout": holdout, "seed": seed, **metrics,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "metrics.json", result)
    manifest.write(out, {}, inputs, ["metrics.json"])
    with open(run.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


def results_table(run: RunFolder, methods: list, holdouts: list) -> str:
    """Markdown table of held-out accuracy (%): rows methods, columns held-out domains + average.

    Uses the latest result for each (method, holdout), averaged over seeds.
    """
    latest = {}
    if run.results.exists():
        for line in run.results.read_text().splitlines():
            r = json.loads(line)
            latest[(r["method"], r["holdout"], r["seed"])] = r["holdout_acc"]
    lines = ["| method | " + " | ".join(holdouts) + " | average |",
             "|---" * (len(holdouts) + 2) + "|"]
    for method in methods:
        cells = []
        for h in holdouts:
            accs = [v for (m, hd, _), v in latest.items() if m == method and hd == h]
            cells.append(100 * float(np.mean(accs)) if accs else float("nan"))
        row = [f"{c:.1f}" for c in cells] + [f"{np.mean(cells):.1f}"]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
