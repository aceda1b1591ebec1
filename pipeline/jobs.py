"""Stage order and bookkeeping: each job checks its inputs, skips fresh work, runs one stage
and records a manifest. The click commands in ``cli.py`` are thin wrappers around these.
"""
import json
import shutil
import time

import click
import torch
from safetensors.torch import load_file, save_file

from cache import store
from cache.fingerprint import sha256_json
from cache.teacher_store import TeacherCache
from cache.index import write_table
from data import domainbed
from data.images import ReplayImages
from data.views import Augment
from pipeline import distributed, manifest
from pipeline.config import ADIP
from pipeline.errors import UserError
from pipeline.runfolder import RunFolder
from stages import align as align_stage
from stages import distill as distill_stage
from stages import evaluate as evaluate_stage
from stages import extract as extract_stage
from stages import probe as probe_stage
from stages.losses import clip_logits
from stages.methods import METHODS
from stages.predict import device
from stages.prompts import templates as template_set_named
from stages.student import create_backbone, feature_dim, student_key
from stages.teacher import checkpoint_fingerprint

CACHE_METHODS = ("zeroshot", "probe")  # the teacher itself, from the cache: no student
ALL_METHODS = (*CACHE_METHODS, *METHODS)


def say(message: str) -> None:
    if distributed.is_main():
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
    inputs = {"dataset": index.fingerprint, "teacher_weights": checkpoint_fingerprint(teacher, pretrained)}
    reason = manifest.why_stale(run.extract, config, inputs)
    if reason is None and not force:
        say(f"extract: up to date ({len(index)} images, {views} views, teacher {teacher}); --force recomputes")
        return
    rank, world = distributed.world()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = OpenClipTeacher(teacher, pretrained, device=device)
    if not model.has_weights:
        say(f"warning: teacher {teacher} has no weights: using a random initialisation")
    wanted = extract_stage.store_attrs(model, index, templates, template_set, views, view_seed, augment, batch_size)
    existing_store = run.teacher_store if run.teacher_store.exists() else \
        extract_stage.shard_path(run.teacher_store, rank, world)
    if world > 1 and run.teacher_store.exists() and not force and store.read_attrs(run.teacher_store).get("shards") != world:
        raise UserError(f"{run.teacher_store} was extracted with another number of processes; resume with the "
                        f"same number, or use --force")
    if existing_store.exists() and not force:
        existing = store.read_attrs(existing_store)
        differs = extract_stage.mismatches(existing, wanted)
        if differs:
            detail = "; ".join(_dataset_change(run, index) if k == "dataset_fingerprint" else
                               f"{k}: cached {_short(existing.get(k))}, now {_short(wanted.get(k))}" for k in differs)
            raise UserError(f"{run.root} holds a cache made with a different {', '.join(differs)} ({detail}); "
                            f"use --force to rebuild it, or a new --run folder")
        say(f"extract: resuming the cache in {run.extract}")
    elif force and run.extract.exists() and distributed.is_main():
        shutil.rmtree(run.extract)
    distributed.barrier()
    run.extract.mkdir(parents=True, exist_ok=True)
    manifest.invalidate(run.extract)
    say(f"extract: {len(index)} images in {len(index.domains)} domains, {len(index.classes)} classes; "
        f"{views} views each; teacher {teacher}" + (f"; {world} processes" if world > 1 else ""))
    settings = dict(templates=templates, template_set=template_set, n_views=views, view_seed=view_seed,
                    augment=augment, batch_size=batch_size)
    try:
        summary = extract_stage.extract(index, model, run.teacher_store, rank=rank, world=world,
                                        workers=workers, **settings)
    except extract_stage.Interrupted as stop:
        say(str(stop))
        raise SystemExit(130)
    if world > 1:
        distributed.barrier()  # every shard is complete
        if not distributed.is_main():
            return
        extract_stage.join_shards(index, model, run.teacher_store, world, **settings)
        joined = store.read(run.teacher_store, "status")
        summary.update(images=len(index), ok=int((joined == store.DONE).sum()),
                       skipped=int((joined == store.FAILED).sum()), processes=world)
    status = store.read(run.teacher_store, "status")
    summary["teacher_image_forwards"] = int((status == store.DONE).sum()) * views
    reasons = extract_stage.skipped_reasons(run.teacher_store)
    index.status = ["ok" if s == store.DONE else reasons.get(p, "skipped") for s, p in zip(status, index.paths)]
    write_table(run.index_path, *index.to_columns())
    if summary["ok"] == 0:
        raise UserError(f"none of the {len(index)} images in {data_root} could be read; "
                        f"reasons in {run.extract / 'skipped.jsonl'}")
    shards = sorted(run.rel(p)[len("extract/"):] for p in (run.extract / "shards").glob("*.h5")) if world > 1 else []
    manifest.write(run.extract, config, inputs, ["teacher.h5", "index.parquet", *shards], summary)
    rate = f" ({summary['images_per_s']} images/s)" if summary["images_per_s"] else ""
    say(f"extract: done in {summary['seconds']} s{rate}; {summary['ok']} images cached")
    if summary["skipped"]:
        say(f"extract: skipped {summary['skipped']} unreadable images; list in {run.extract / 'skipped.jsonl'}")


def _dataset_change(run: RunFolder, index) -> str:
    """What changed in the dataset since the cached index: added, removed, modified files."""
    if not run.index_path.exists():
        return "the dataset changed"
    cached = run.load_index()
    before = {p: (s, m) for p, s, m in zip(cached.paths, cached.size.tolist(), cached.mtime_ns.tolist())}
    now = {p: (s, m) for p, s, m in zip(index.paths, index.size.tolist(), index.mtime_ns.tolist())}
    added, removed = len(now.keys() - before.keys()), len(before.keys() - now.keys())
    changed = sum(1 for p in now.keys() & before.keys() if now[p] != before[p])
    return f"dataset: {added} images added, {removed} removed, {changed} modified since extraction"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def align(run: RunFolder, *, student: str, student_weights: str, student_size, holdout: str,
          steps: int, per_domain: int, lr: float, lam: float, seed: int, eval_every: int,
          batch_size: int, workers: int, force: bool) -> str:
    """Cache the frozen student's features (once per student) and align for ``holdout``."""
    _check_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
    _check_rates({"lr": lr})
    index = run.load_index()
    sources = index.check_holdout(holdout)
    _source_val_rows(index, sources)
    teacher_input = _teacher_input(run)
    key = student_key(student, student_weights, student_size)
    features_dir = run.features(key)
    features_path = features_dir / "features.h5"
    features_config = {"student": student, "student_weights": student_weights, "student_size": student_size}
    reason = manifest.why_stale(features_dir, features_config, teacher_input)
    if reason is not None or force:
        manifest.invalidate(features_dir)
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
    manifest.invalidate(out)
    cache = TeacherCache(run.teacher_store)
    features = torch.from_numpy(store.read(features_path, "features"))
    labels = torch.as_tensor(index.label)
    train_rows = [index.rows([d], domainbed.TRAIN) for d in sources]
    started = time.time()
    state, log = align_stage.align(features, cache.image_emb, cache.classifier, labels, train_rows,
                                   _source_val_rows(index, sources), steps=steps, per_domain=per_domain,
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


def _source_val_rows(index, sources: list):
    rows = index.rows(sources, domainbed.VAL)
    if not len(rows):
        raise UserError("the source domains have no validation images; extract with a larger --val-fraction")
    return rows


def _check_rates(hparams: dict) -> None:
    for name, value in hparams.items():
        if value is None:
            continue
        if (name == "lr" and value < 0) or (name == "temperature" and value <= 0):
            raise UserError(f"--{name} must be {'non-negative' if name == 'lr' else 'positive'}, got {value}")


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is None or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _student_for(run: RunFolder, method: str, holdout: str, student: str | None, student_weights: str,
                 student_size) -> tuple[str, dict]:
    """(key, description) of the student a method trains for ``holdout``."""
    if method in CACHE_METHODS:
        return "teacher", {"student": "teacher"}
    if method == "sd":
        return "teacher-image-tower", {"student": "teacher-image-tower"}
    if METHODS[method].needs_alignment or student is None:
        key = run.resolve_student(holdout, student if METHODS[method].needs_alignment else None)
        return key, json.loads((run.features(key) / "student.json").read_text())
    return student_key(student, student_weights, student_size), {
        "student": student, "student_weights": student_weights, "student_size": student_size}


def _cached_teacher(cache: TeacherCache, weights: bool = True):
    """The teacher the cache was made with (its architecture only, without ``weights``)."""
    from stages.teacher import OpenClipTeacher
    teacher = OpenClipTeacher(cache.attrs["teacher"], cache.attrs["pretrained"] if weights else None,
                              device="cuda" if torch.cuda.is_available() else "cpu")
    if weights and teacher.identity["checkpoint_sha256"] != cache.attrs["checkpoint_sha256"]:
        raise UserError(f"the teacher checkpoint changed since extraction ({cache.attrs['teacher']}, "
                        f"{cache.attrs['pretrained']}); this needs the teacher the cache was made with")
    return teacher


def _build(method: str, info: dict, cache: TeacherCache, text, load_teacher_weights: bool):
    """The method's model (untrained head) and its input spec, from a student description."""
    if method == "sd":
        teacher = _cached_teacher(cache, weights=load_teacher_weights)
        tower = teacher.model.visual.float()
        return METHODS[method].build(tower, cache.dim, text), teacher.input_spec
    backbone, spec = create_backbone(info["student"], info["student_weights"], info["student_size"])
    return METHODS[method].build(backbone, feature_dim(backbone), text), spec


def _anchor_names(cache: TeacherCache, sources: list, anchors: str) -> list:
    if anchors == "domains":
        return sources
    if anchors == "generic":
        return [a for a in cache.anchor_names if a not in cache.attrs["domains"]]
    raise UserError(f"--anchors must be 'domains' or 'generic', got '{anchors}'")


def distill(run: RunFolder, *, method: str, holdout: str, student: str | None = None,
            student_weights: str = "imagenet", student_size=None, steps: int, per_domain: int,
            seed: int = 0, eval_every: int, workers: int = 0, force: bool = False,
            hparams: dict | None = None, cutmix: float = 0.0, swad: bool | None = None,
            anchors: str = "domains", teacher_online: bool = False) -> str:
    """Train ``method`` for ``holdout`` and save its best (and SWAD) weights.

    ``teacher_online`` runs the teacher on every replayed view instead of reading the cache:
    the official code's way, kept as the reference the cache is checked against.
    """
    if method not in ALL_METHODS or method == "zeroshot":
        raise UserError(f"unknown method '{method}' for distill; choose from "
                        f"{', '.join(m for m in ALL_METHODS if m != 'zeroshot')}")
    _check_positive(steps=steps, per_domain=per_domain, eval_every=eval_every)
    if not 0.0 <= cutmix <= 1.0:
        raise UserError(f"--cutmix is a probability in [0, 1], got {cutmix}")
    _check_rates(hparams or {})
    index = run.load_index()
    sources = index.check_holdout(holdout)
    val_rows = _source_val_rows(index, sources)
    key, info = _student_for(run, method, holdout, student, student_weights, student_size)
    inputs = _teacher_input(run)
    if method == "adip":
        projection_path = run.align(key, holdout) / "projection.safetensors"
        inputs[run.rel(projection_path)] = manifest.output_hash(run.root, run.rel(projection_path))
    use_swad = METHODS[method].swad_default if (swad is None and method in METHODS) else bool(swad)
    hparams = {k: v for k, v in (hparams or {}).items() if v is not None}
    config = {"method": method, "student": info, "steps": steps, "per_domain": per_domain, "seed": seed,
              "eval_every": eval_every, "hparams": hparams, "cutmix": cutmix, "swad": use_swad,
              "anchors": anchors, **({"teacher_online": True} if teacher_online else {})}
    if teacher_online and method == "probe":
        raise UserError("--teacher-online applies to student methods, not the probe")
    out = run.distill(method, key, holdout, seed)
    if manifest.why_stale(out, config, inputs) is None and not force:
        say(f"distill: {method} up to date for held-out '{holdout}' ({key}, seed {seed}); --force recomputes")
        return key
    cache = TeacherCache(run.teacher_store)
    train_rows = [index.rows([d], domainbed.TRAIN) for d in sources]
    started = time.time()
    if method == "probe":
        manifest.invalidate(out)
        state, log = probe_stage.train_probe(cache.image_emb, torch.as_tensor(index.label), train_rows, val_rows,
                                             steps=steps, per_domain=per_domain, seed=seed,
                                             eval_every=eval_every, **hparams)
        states, outputs = {"best": state}, ["best.safetensors"]
    else:
        text = cache.text(_anchor_names(cache, sources, anchors))
        model, spec = _build(method, info, cache, text, load_teacher_weights=True)
        if method == "adip":
            model.projection.load_state_dict(load_file(projection_path))
        trainer = METHODS[method](model, text, steps, **hparams)
        online = distill_stage.OnlineTargets(_cached_teacher(cache)) if teacher_online else None
        dataset = ReplayImages(index.root, index.paths, cache.view_params, spec,
                               teacher_spec=online.teacher.input_spec if online else None)
        say(f"distill: {method}, {info['student']} on {', '.join(sources)} -> held-out '{holdout}', "
            f"{steps} steps of {per_domain} images per domain{', SWAD' if use_swad else ''}"
            f"{f', CutMix p={cutmix}' if cutmix else ''}")
        out.mkdir(parents=True, exist_ok=True)
        manifest.invalidate(out)  # only now: a failed check above leaves the finished result intact
        resume = out / "resume.pt"
        if force:
            resume.unlink(missing_ok=True)
        rank, world = distributed.world()
        if (per_domain * len(sources)) % world:
            raise UserError(f"--per-domain {per_domain} x {len(sources)} source domains must split evenly "
                            f"over {world} processes")
        try:
            states, log = distill_stage.distill(
                trainer, dataset, cache, index.label, train_rows, val_rows, steps=steps, per_domain=per_domain,
                seed=seed, eval_every=eval_every, workers=workers, cutmix_p=cutmix, swad=use_swad,
                resume_path=resume, resume_key=sha256_json({"config": config, "inputs": inputs}), online=online,
                rank=rank, world=world)
        except extract_stage.Interrupted as stop:
            say(str(stop))
            raise SystemExit(130)
        outputs = [f"{name}.safetensors" for name in states]
        if not distributed.is_main():
            return key  # checkpoints and results are written once, by rank 0
    out.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        save_file({k: v.contiguous() for k, v in state.items()}, out / f"{name}.safetensors")
    _write_json(out / "config.json", {**config, "holdout": holdout, "sources": sources, "student_key": key})
    _write_jsonl(out / "log.jsonl", log)
    summary = {**log[-1], "seconds": round(time.time() - started, 1)}
    manifest.write(out, config, inputs, outputs + ["config.json"], summary)
    (out / "resume.pt").unlink(missing_ok=True)
    say(f"distill: {method} held-out '{holdout}': best source-val accuracy {summary['best_source_val_acc']:.3f} "
        f"at step {summary['best_step']} ({summary['seconds']} s)")
    return key


def evaluate(run: RunFolder, *, method: str, holdout: str, student: str | None = None, seed: int = 0,
             model: str = "best", workers: int = 0, force: bool = False) -> dict:
    """Score a trained model (``model``: best or swad) or the cached teacher; append to results.jsonl."""
    if method not in ALL_METHODS:
        raise UserError(f"unknown method '{method}'; choose from {', '.join(ALL_METHODS)}")
    if model not in ("best", "swad"):
        raise UserError(f"--model must be 'best' or 'swad', got '{model}'")
    index = run.load_index()
    index.check_holdout(holdout)
    inputs = _teacher_input(run)
    cache_attrs = store.read_attrs(run.teacher_store)
    if method == "zeroshot":
        key, model = "teacher", "cache"
    else:
        key = _student_for(run, method, holdout, student, "", None)[0] if method in ("probe", "sd") \
            else run.trained_student(method, holdout, student, seed)
        weights = run.distill(method, key, holdout, seed) / f"{model}.safetensors"
        digest = manifest.output_hash(run.root, run.rel(weights))
        if digest is None:
            raise UserError(f"no trained {method} model ({model}) for held-out '{holdout}', seed {seed}; run "
                            f"`pipeline distill --run {run.root} --method {method} --holdout {holdout}` first")
        inputs[run.rel(weights)] = digest
    label = method + ("+swad" if model == "swad" else "")
    out = run.evaluate(label, key, holdout, seed)
    if manifest.why_stale(out, {}, inputs) is None and not force:
        return json.loads((out / "metrics.json").read_text())
    cache = TeacherCache(run.teacher_store)
    if method == "zeroshot":
        metrics = evaluate_stage.evaluate_cached(
            lambda emb: clip_logits(emb, cache.classifier), cache, index, holdout)
    elif method == "probe":
        head = load_file(weights)
        metrics = evaluate_stage.evaluate_cached(lambda emb: probe_stage.probe_logits(head, emb), cache, index, holdout)
    else:
        trained = json.loads((weights.parent / "config.json").read_text())
        sources = trained["sources"]
        text = cache.text(_anchor_names(cache, sources, trained["anchors"]))
        net, spec = _build(method, trained["student"], cache, text, load_teacher_weights=False)
        net.load_state_dict(load_file(weights))
        trainer = METHODS[method](net.to(device()), text, 1)
        dataset = ReplayImages(index.root, index.paths, cache.view_params, spec)
        metrics = evaluate_stage.evaluate_student(trainer.predict, dataset, index, holdout, workers)
    result = {"method": method, "model": model, "student": key, "teacher": cache_attrs["teacher"],
              "pretrained": cache_attrs["pretrained"], "holdout": holdout, "seed": seed, **metrics,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out.mkdir(parents=True, exist_ok=True)
    manifest.invalidate(out)
    _write_json(out / "metrics.json", result)
    manifest.write(out, {}, inputs, ["metrics.json"])
    with open(run.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    return result

