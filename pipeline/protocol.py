"""`pipeline run`: leave-one-domain-out over every held-out domain, method and seed, from one
extraction, then the results table."""
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch

from cache import manifest
from cache.errors import UserError
from cache.progress import say
from data import demo
from pipeline import config, report
from stages.runfolder import RunFolder
from stages import remote_teacher, stage
from stages.align import run_alignment
from stages.distill import Distill
from stages.evaluate import Evaluate
from stages.extract import Extract
from stages.methods import METHODS


def parse_list(text: str, name: str, kind=str) -> list:
    """Comma-separated values of ``kind``; each at most once (a seed given twice would be counted
    as two seeds in the standard error)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise UserError(f"--{name} needs at least one value")
    try:
        values = [kind(v) for v in values]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated integers, got '{text}'") from None
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise UserError(f"--{name} names {repeated} more than once; give each value once")
    return values


def variant_name(hparams: dict) -> str:
    """Folder suffix of one sweep point, e.g. ``w_kd0.9-w_ce0.1-w_dist0.5``."""
    return "-".join(f"{k}{v:g}" for k, v in hparams.items())


def resolve_settings(real_data: bool, overrides: dict, methods: str | None, seeds: str,
                     preset: str | None) -> tuple[dict, list, list]:
    """(settings, methods, seeds) of a run: the demo's or a user's defaults, the preset, the options."""
    settings = dict(config.REAL if real_data else config.DEMO)
    if preset is not None:
        if preset not in config.PRESETS:
            raise UserError(f"unknown preset '{preset}'; choose from {', '.join(config.PRESETS)}")
        settings.update(config.PRESETS[preset], preset=preset)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    chosen_methods = parse_list(methods, "methods") if methods else \
        [m for m, cls in METHODS.items() if cls.in_default_run]
    unknown = [m for m in chosen_methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    seed_list = parse_list(seeds, "seeds", int)
    if remote_teacher.is_remote(settings["teacher"]):
        remote_teacher.check_url(settings["teacher"])  # before the settings are printed
    return settings, chosen_methods, seed_list


def run_all(*, data_root, run_dir, overrides: dict, methods: str | None, seeds: str, holdouts,
            workers: int, force: bool, cutmix: float = 0.0, preset: str | None = None,
            pixel_cache: str = "raw", jobs: int = 1, teachers: str | None = None, rescan: bool = False,
            log: str = "none") -> str:
    if teachers and overrides.get("teacher"):
        raise UserError("give --teacher or --teachers, not both (the first of --teachers is the run's teacher)")
    if teachers:  # the first is --teacher; every one is extracted, and trained against as an ensemble
        overrides = {**overrides, "teachers": parse_list(teachers, "teachers"),
                     "teacher": parse_list(teachers, "teachers")[0]}
    settings, chosen_methods, seed_list = resolve_settings(data_root is not None, overrides, methods, seeds, preset)
    holdout_list = parse_list(holdouts, "holdouts") if holdouts else None  # refused before any work
    run = RunFolder(run_dir or config.DEMO_RUN)
    timings = {}
    timed = partial(_timed, timings)
    say("run: settings " + json.dumps({**settings, "teacher": remote_teacher.redact(settings["teacher"])}
                                      if remote_teacher.is_remote(settings["teacher"]) else settings))

    with run.writing():
        if data_root is None:
            data_root = run.demo_data
            demo.generate(data_root)
            say(f"run: built-in demo dataset in {data_root}")
        extractions = []
        for spec in settings.get("teachers", [settings["teacher"]]):  # each placed once the one before is cached
            extractions.append(Extract(run, data_root, **teacher_and_tag(spec, settings["pretrained"]),
                                       views=settings["views"], batch_size=64, workers=workers, rescan=rescan,
                                       log=log))
            timed("extract", lambda: stage.run(extractions[-1], force))
        trained_against = run.using([e.name for e in extractions] if len(extractions) > 1 else None)
        index = run.load_index()
        chosen = holdout_list or index.domains
        for holdout in chosen:
            index.check_holdout(holdout)
        shared = UnitSettings(settings=settings, methods=chosen_methods, first_seed=seed_list[0],
                    n_sources=len(index.domains) - 1, cutmix=cutmix, pixel_cache=pixel_cache, workers=workers,
                    force=force, log=log, teachers=trained_against.teachers)
        done = run_units(run, shared, [(holdout, seed) for holdout in chosen for seed in seed_list], jobs)
        results = [r for unit in done for r in unit["results"]]
        sweeps = [s for unit in done for s in unit["sweeps"]]
        official = sum(unit["official"] for unit in done)
        for unit in done:
            for name, seconds in unit["timings"].items():
                timings[name] = timings.get(name, 0.0) + seconds
        labels = [report.row_label({"method": m, "model": model, "teachers": teachers.teacher_label})
                  for teachers, names in unit_passes(run, trained_against, chosen_methods)
                  for m in names for model in METHODS[m].models()]
        table = report.summarize(results, labels, chosen)  # this run's results only
        ours = sum(manifest.load(e.folder)["summary"].get("teacher_image_forwards", 0) for e in extractions)
        footer = (f"\nTeacher image forwards: {ours:,} in this run (one extraction per teacher); the official "
                  f"online-teacher code would use {official:,} for the same protocol "
                  f"(steps x batch x stages x held-out domains x seeds).\n")
        text = report.markdown(table, chosen) + footer
        run.table.write_text(text)
        plotted = report.bar_chart(table, chosen, run.table.with_suffix(".png"))
        run.protocol.write_text(json.dumps(
            {"methods": chosen_methods, "seeds": seed_list, "holdouts": chosen, "settings": settings,
             "sweeps": sweeps, "official_teacher_forwards": official, "teacher_image_forwards": ours}, indent=2))
    say("run: stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"\nHeld-out domain accuracy (%), mean ± standard error over seeds {','.join(map(str, seed_list))}; "
          f"teacher {settings['teacher'].split('/')[-1]}, student {settings['student']}:\n")
    print(text)
    say(f"run: table saved to {run.table}" + (f" and {run.table.with_suffix('.png')}" if plotted else "")
             + f"; every result in {run.results}")
    return text


def run_units(run, shared: "UnitSettings", units: list, jobs: int) -> list:
    """Every (held-out domain, seed) unit, in this process or in ``jobs`` processes side by side
    (each stage locks only its own folder)."""
    if jobs == 1:
        return [run_unit(run.root, shared, *unit) for unit in units]
    say(f"run: {len(units)} (held-out domain, seed) trainings over {jobs} processes")
    devices = multiprocessing.get_context("spawn").Manager().Queue()
    for i in range(jobs):
        devices.put(i % torch.cuda.device_count() if torch.cuda.device_count() else None)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_device, initargs=(devices, jobs)) as pool:
        return list(pool.map(run_unit, [run.root] * len(units), [shared] * len(units), *zip(*units)))


@dataclass
class UnitSettings:
    """What every (held-out domain, seed) training of one `pipeline run` shares."""

    settings: dict
    methods: list
    first_seed: int
    n_sources: int
    cutmix: float
    pixel_cache: str
    workers: int
    force: bool
    log: str  # run tracking: none, tensorboard or wandb
    teachers: tuple | None = None  # an ensemble's teacher names (``RunFolder.teachers``)


def _timed(timings: dict, name: str, fn):
    """``fn()``, its wall time added to ``timings[name]``."""
    started = time.time()
    try:
        return fn()
    finally:
        timings[name] = timings.get(name, 0.0) + time.time() - started


def _one_device(devices, jobs: int) -> None:
    """Pool worker start: one accelerator each (if any), and a fair share of the CPU threads."""
    device = devices.get()
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))


def teacher_and_tag(spec: str, pretrained) -> dict:
    """``--teachers`` items: a --teacher value, with an open_clip pretrained tag after '@'
    (``ViT-B-16@openai``); without one, --pretrained applies."""
    teacher, _, tag = spec.partition("@") if not spec.startswith(("http://", "https://")) else (spec, "", "")
    return {"teacher": config.DEMO_TEACHERS.get(teacher, teacher), "pretrained": tag or pretrained}


def unit_passes(run, trained_against, methods: list) -> list:
    """(run folder against some teachers, methods) of a unit: every method against the chosen
    teachers; with an ensemble, the per-teacher methods (zero-shot, probe) on each teacher too."""
    passes = [(trained_against, methods)]
    if trained_against.teachers and len(trained_against.teachers) > 1:
        passes += [(run.using([name]), [m for m in methods if METHODS[m].per_teacher])
                   for name in trained_against.teachers]
    return passes


def run_unit(run_root, shared: UnitSettings, holdout: str, seed: int) -> dict:
    """Align (once per held-out domain and seed), then train and evaluate every method."""
    settings, force, workers = shared.settings, shared.force, shared.workers
    every, run = RunFolder(run_root), RunFolder(run_root, shared.teachers)
    timings, sweeps, results, official = {}, [], [], 0
    timed = partial(_timed, timings)

    say(f"run: held-out domain '{holdout}', seed {seed}")
    student = {"student": settings["student"], "student_weights": settings["student_weights"],
               "student_size": settings["student_size"]}
    train = {"steps": settings["steps"], "per_domain": settings["per_domain"],
             "eval_every": settings["eval_every"], "workers": workers}
    aligned = None  # this run's student, so other students in the run folder are never mixed in
    if any(METHODS[m].needs_alignment for m in shared.methods):
        aligned = timed("align", lambda: run_alignment(
            run, **student, holdout=holdout, steps=settings["align_steps"], per_domain=settings["per_domain"],
            lr=settings["align_lr"], seed=seed, eval_every=settings["eval_every"], workers=workers, force=force,
            log=shared.log))
    trained_key = aligned
    for against, names in unit_passes(every, run, shared.methods):
        for name in names:
            method = METHODS[name]
            if not method.seeded and seed != shared.first_seed:
                continue  # no randomness: one evaluation serves every seed
            preset_settings = config.method_settings(settings, name)
            hparams = {**(method.demo if settings["demo"] else {}), **preset_settings.get("hparams", {})}
            points = preset_settings.get("grid") or [{}]
            selected = {"variant": None}
            if method.trains:
                own = method.run_options(student, aligned)
                candidates = []
                for point in points:  # a preset's sweep: every point from the same cache
                    variant = variant_name(point) if len(points) > 1 else None
                    distill = Distill(against, name, holdout, **own, seed=seed, hparams={**hparams, **point},
                                      anchors=preset_settings.get("anchors", "domains"), variant=variant,
                                      pixel_cache=shared.pixel_cache, log=shared.log,
                                      **{**train, **method.schedule(settings, shared.cutmix)})
                    summary = timed("distill", lambda: stage.run(distill, force))
                    candidates.append({"variant": variant, "hparams": point,
                                       "best_source_val_acc": summary["best_source_val_acc"]})
                    trained_key = distill.key
                # selected by source validation alone (the first on ties; no test-set tie-break)
                selected = max(candidates, key=lambda c: c["best_source_val_acc"])
                if len(points) > 1:
                    sweeps.append({"method": name, "holdout": holdout, "seed": seed,
                                   "selected": selected["hparams"], "candidates": candidates})
                    say(f"run: {name} held-out '{holdout}' seed {seed}: selected {selected['hparams']} "
                        f"of {len(points)} by source validation ({100 * selected['best_source_val_acc']:.1f}%)")
            for model in method.models():
                result = timed("evaluate", lambda: stage.run(Evaluate(
                    against, name, holdout, student=trained_key,
                    seed=seed, model=model, workers=workers, variant=selected["variant"]), force, quiet=True))
                results.append(result)
                say(f"run: {report.row_label(result):>12} held-out '{holdout}' seed {seed}: "
                    f"{100 * result['holdout_acc']:.1f}% (source val {100 * result['source_val_acc']:.1f}%)")
            official += len(points) * method.official_teacher_forwards(
                steps=settings["steps"], align_steps=settings["align_steps"], batch=settings["per_domain"] * shared.n_sources)
    return {"results": results, "sweeps": sweeps, "official": official, "timings": timings}
