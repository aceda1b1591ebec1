"""The ``pipeline`` command: extract, align, distill, evaluate, run, info."""
import json
import os
import sys
from pathlib import Path

import click

from cache import space
from cache.errors import UserError
from cache.progress import Interrupted
from data.images import BadImage
from pipeline import config
from stages.runfolder import RunFolder
from stages import stage, tracking
from stages.align import run_alignment
from stages.distill import Distill
from stages.evaluate import Evaluate
from stages.extract import VIEWS, Extract
from stages.pixels import FORMS as PIXEL_FORMS
from stages.methods import ALIGN_HPARAMS, DEFAULT_METHOD, HPARAM_HELP, METHODS, all_hparams

HELD_OUT = click.option("--holdout", required=True, help="The domain left out of training (evaluated as unseen).")
RUN = click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
                   help="Run folder holding every cache and output.")
POSITIVE = click.IntRange(min=1)
WORKERS = click.option("--workers", default=min(4, os.cpu_count() or 1), show_default=True, type=click.IntRange(min=0),
                       help="DataLoader worker processes that decode and augment images.")
FORCE = click.option("--force", is_flag=True, help="Recompute even if the stage is up to date.")
RESCAN = click.option("--rescan", is_flag=True,
                      help="List and stat every image even when no domain or class folder changed (finds images "
                           "rewritten in place).")
PIXEL_CACHE = click.option(
    "--pixel-cache", type=click.Choice(PIXEL_FORMS), default="raw", show_default=True,
    help="Train from the student's view pixels rendered once (raw uint8; lossless webp: ~0.5x the disk, "
         "exact; jpeg: quality 90, ~0.2x the disk, lossy), or 'none': decode and render every step (the reference).")
SEED = click.option("--seed", default=0, show_default=True, help="Training seed.")
TEACHERS = click.option(
    "--teachers", default=None,
    help="Comma-separated extracted teachers to train and score against (names, e.g. ViT-B-16-openai, or the "
         "--teacher they were extracted with); several: their ensemble. Default: the run folder's first teacher.")


def _installed(ctx, param, backend: str) -> str:
    """--log: a back-end whose package is missing is refused before any work."""
    tracking.require(backend)
    return backend


LOG = click.option(
    "--log", type=click.Choice(tracking.BACKENDS), default=tracking.DEFAULT, show_default=True, callback=_installed,
    help="Track training in each stage's folder: per-step loss and its terms, learning rate, images/s, "
         "source-validation accuracy, SWAD's events (tensorboard, or wandb: offline unless WANDB_API_KEY is set).")
PER_DOMAIN = click.option("--per-domain", default=config.REAL["per_domain"], show_default=True,
                          help="Images per source domain in each step.")


class Failure(click.ClickException):
    """What the user must act on: one line ``Error: ...``, exit code 2, never a traceback."""

    exit_code = 2


class Commands(click.Group):
    """Turns user errors and environment failures (disk full, read-only or unwritable folder)
    into one line with exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise Failure(str(e))
        except Interrupted as e:  # Ctrl-C: stopped at a safe point, everything written is kept
            click.echo(str(e), err=True)
            raise SystemExit(130)
        except BadImage as e:  # an image changed or vanished after extraction
            raise Failure(f"{e}; the dataset changed since extraction: re-run `pipeline extract`")
        except OSError as e:
            said = space.sentence(e)
            if said is None and e.errno is not None:
                raise
            # HDF5's own I/O errors without an errno: its message says what failed
            raise Failure(f"{said or e}; what was already written and verified is kept (re-run the same "
                          f"command to continue)")


def hparam_options(command):
    """One option per method hyperparameter, its help listing each method's default."""
    for name, defaults in reversed(list(all_hparams().items())):
        per_method = ", ".join(f"{m} {v:g}" for m, v in defaults.items())
        command = click.option(f"--{name.replace('_', '-')}", name, type=float, default=None,
                               help=f"{HPARAM_HELP[name]} Default: {per_method}.")(command)
    return command


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clip-distill-pipeline")
def main():
    """Distil a CLIP teacher into a small student for domain generalisation, from cached
    teacher embeddings: extract once, then align, distill and evaluate without the teacher."""


@main.command()
@click.option("--data", "data_root", required=True, type=click.Path(),
              help="Dataset root in DomainBed layout: ROOT/<domain>/<class>/<image>.")
@RUN
@click.option("--teacher", default=config.REAL["teacher"], show_default=True,
              help="open_clip model name, local-dir:PATH (config and weights in a folder), hf-hub:ORG/REPO, or the URL of a "
                   "teacher service (http(s)://HOST:PORT[/v2/models/NAME]; token in $PIPELINE_TEACHER_TOKEN).")
@click.option("--pretrained", default=config.REAL["pretrained"], show_default=True,
              help="open_clip pretrained tag, a local checkpoint file, or 'none' (ignored for a URL).")
@click.option("--max-queries", type=click.IntRange(min=0), default=None,
              help="Remote teacher: refuse to start if the extraction needs more image + text queries than this.")
@click.option("--teacher-concurrency", default=4, show_default=True, type=POSITIVE,
              help="Remote teacher: requests in flight at once.")
@click.option("--views", default=VIEWS, type=POSITIVE, show_default=True, help="Views per image (view 0 = eval view).")
@click.option("--view-seed", default=0, show_default=True, help="Seed of the view sampler.")
@click.option("--templates", "template_set", default="photo", show_default=True,
              help="Prompt template set: photo, rise7 or styles.")
@click.option("--val-fraction", default=0.2, show_default=True, help="Per-domain validation fraction.")
@click.option("--split-seed", default=0, show_default=True, help="DomainBed trial seed of the train/val split.")
@click.option("--batch-size", default=64, type=POSITIVE, show_default=True, help="Images per teacher batch.")
@WORKERS
@RESCAN
@FORCE
def extract(data_root, run_dir, teacher, pretrained, max_queries, teacher_concurrency, views, view_seed,
            template_set, val_fraction, split_seed, batch_size, workers, rescan, force):
    """Cache the teacher's embeddings of K views of every image and of every class prompt."""
    given = click.get_current_context().get_parameter_source("pretrained") == click.core.ParameterSource.COMMANDLINE
    if teacher.startswith("local-dir:") and given and _none(pretrained):
        raise UserError("--pretrained does not apply to a local-dir: teacher: its folder holds the weights")
    with RunFolder(run_dir).writing() as run:
        stage.run(Extract(run, data_root, teacher=teacher, pretrained=_none(pretrained), views=views,
                          view_seed=view_seed, template_set=template_set, val_fraction=val_fraction,
                          split_seed=split_seed, batch_size=batch_size, workers=workers,
                          max_queries=max_queries, teacher_concurrency=teacher_concurrency, rescan=rescan), force)


def _none(value):
    return None if value in (None, "", "none", "None") else value


def _listed(text: str | None) -> list | None:
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


@main.command()
@RUN
@click.option("--student", default=config.REAL["student"], show_default=True, help="timm model name.")
@click.option("--student-weights", default=config.REAL["student_weights"], show_default=True,
              help="'imagenet' (timm pretrained), 'none' (random init) or a local weights file.")
@click.option("--student-size", type=POSITIVE, default=None, help="Student input size (default: the model's).")
@HELD_OUT
@click.option("--steps", default=config.REAL["align_steps"], show_default=True, help="Alignment steps.")
@PER_DOMAIN
@click.option("--lr", default=ALIGN_HPARAMS["lr"], show_default=True, help="Adam learning rate.")
@click.option("--lam", default=ALIGN_HPARAMS["lam"], show_default=True, help=HPARAM_HELP["lam"])
@SEED
@click.option("--eval-every", default=100, show_default=True, help="Steps between source-val checks.")
@click.option("--batch-size", default=128, type=POSITIVE, show_default=True, help="Images per feature batch.")
@TEACHERS
@LOG
@WORKERS
@FORCE
def align(run_dir, student, student_weights, student_size, holdout, steps, per_domain, lr, lam, seed,
          eval_every, batch_size, teachers, log, workers, force):
    """Fit the projection from the frozen student's (cached) features to the teacher's space."""
    with RunFolder(run_dir).using(_listed(teachers)).writing() as run:
        run_alignment(run, student=student, student_weights=student_weights, student_size=student_size,
                      holdout=holdout, steps=steps, per_domain=per_domain, lr=lr, lam=lam, seed=seed,
                      eval_every=eval_every, batch_size=batch_size, workers=workers, force=force, log=log)



TRAINED = [m for m, cls in METHODS.items() if cls.trains]


@main.command()
@RUN
@click.option("--method", default=DEFAULT_METHOD, show_default=True, type=click.Choice(TRAINED),
              help="The method to train.")
@HELD_OUT
@click.option("--student", default=None,
              help="timm model name; for methods that start from an alignment, picks among the aligned "
                   "students. Default: the student aligned for this held-out domain.")
@click.option("--student-weights", default=config.REAL["student_weights"], show_default=True,
              help="'imagenet', 'none' or a weights file (with --student).")
@click.option("--student-size", type=POSITIVE, default=None, help="Student input size (with --student).")
@click.option("--steps", default=config.REAL["steps"], show_default=True, help="Training steps.")
@PER_DOMAIN
@SEED
@click.option("--eval-every", default=config.REAL["eval_every"], show_default=True,
              help="Steps between source-val checks.")
@hparam_options
@click.option("--anchors", type=click.Choice(["domains", "generic"]), default="domains", show_default=True,
              help="RISE's relative-distance anchors: source-domain names, or bright/corrupted/dark/good photo.")
@click.option("--cutmix", type=float, default=0.0, show_default=True, help="CutMix probability per step.")
@click.option("--swad/--no-swad", default=None, help="SWAD weight averaging (default: the method's).")
@click.option("--teacher-online", is_flag=True,
              help="Run the teacher on every replayed view instead of reading the cache (the reference).")
@PIXEL_CACHE
@TEACHERS
@LOG
@WORKERS
@FORCE
def distill(run_dir, method, holdout, student, student_weights, student_size, steps, per_domain, seed,
            eval_every, anchors, cutmix, swad, teacher_online, pixel_cache, teachers, log, workers, force,
            **hparams):
    """Train a student on replayed views against the cached teacher embeddings."""
    with RunFolder(run_dir).using(_listed(teachers)).writing() as run:
        stage.run(Distill(run, method, holdout, student=student, student_weights=student_weights,
                          student_size=student_size, steps=steps, per_domain=per_domain, seed=seed,
                          eval_every=eval_every, workers=workers, hparams=hparams, cutmix=cutmix, swad=swad,
                          anchors=anchors, teacher_online=teacher_online, pixel_cache=pixel_cache, log=log), force)


@main.command()
@RUN
@click.option("--method", default=DEFAULT_METHOD, show_default=True, type=click.Choice(list(METHODS)),
              help="The method to evaluate.")
@HELD_OUT
@click.option("--student", default=None, help="Student name or key, if several were trained.")
@click.option("--model", default="best", show_default=True,
              help="best (source-validation selection) or swad (the averaged weights).")
@SEED
@TEACHERS
@WORKERS
@FORCE
def evaluate(run_dir, method, holdout, student, model, seed, teachers, workers, force):
    """Per-domain accuracy; appends one JSON object to RUN/results.jsonl."""
    with RunFolder(run_dir).using(_listed(teachers)).writing() as run:
        result = stage.run(Evaluate(run, method, holdout, student=student, seed=seed, model=model,
                                    workers=workers), force, quiet=True)
    click.echo(json.dumps({k: result[k] for k in ("method", "model", "holdout", "seed", "holdout_acc",
                                                   "source_val_acc", "accuracy", "split")}))


@main.command()
@click.option("--data", "data_root", default=None, type=click.Path(),
              help="Dataset root (DomainBed layout). Default: generate the built-in demo.")
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False),
              help=f"Run folder. Default: {config.DEMO_RUN}.")
@click.option("--methods", default=None,
              help="Comma-separated methods (default: "
                   f"{','.join(m for m, cls in METHODS.items() if cls.in_default_run)}; "
                   f"also {','.join(m for m, cls in METHODS.items() if not cls.in_default_run)}).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds.")
@click.option("--holdouts", default=None, help="Comma-separated held-out domains (default: all).")
@click.option("--teacher", default=None, help="open_clip model name, local-dir:PATH, or a teacher service URL.")
@click.option("--pretrained", default=None, help="open_clip tag or checkpoint file.")
@click.option("--teachers", default=None,
              help="Comma-separated teachers (each as --teacher, an open_clip tag after '@': ViT-B-16@openai): "
                   "each is extracted, every method trains against their ensemble, and zero-shot and probe "
                   "are also scored per teacher.")
@click.option("--student", default=None, help="timm model name.")
@click.option("--student-weights", default=None, help="imagenet, none or a weights file.")
@click.option("--student-size", type=POSITIVE, default=None, help="Student input size.")
@click.option("--views", type=POSITIVE, default=None, help="Views per image.")
@click.option("--steps", type=POSITIVE, default=None, help="Training steps per method, held-out domain and seed.")
@click.option("--align-steps", type=POSITIVE, default=None, help="Alignment steps (adip).")
@click.option("--per-domain", type=POSITIVE, default=None, help="Images per source domain per step.")
@click.option("--eval-every", type=POSITIVE, default=None, help="Steps between source-val checks.")
@click.option("--cutmix", type=float, default=0.0, show_default=True, help="CutMix probability per step.")
@click.option("--preset", type=click.Choice(list(config.PRESETS)), default=None,
              help="The official per-dataset numbers (steps, validation interval, per-method settings and "
                   "hyperparameter sweeps); explicit options still override them.")
@PIXEL_CACHE
@RESCAN
@click.option("--jobs", default=1, show_default=True, type=POSITIVE,
              help="Processes that train (held-out domain, seed) pairs side by side; one GPU each when "
                   "there are GPUs.")
@LOG
@WORKERS
@FORCE
def run(data_root, run_dir, methods, seeds, holdouts, teacher, pretrained, teachers, student, student_weights,
        student_size, views, steps, align_steps, per_domain, eval_every, cutmix, preset, pixel_cache, rescan, jobs,
        log, workers, force):
    """Every held-out domain x method x seed from one extraction, then the table.

    With no arguments: the built-in demo (generated shapes in four styles, tiny models).
    Finished work is skipped on re-run.
    """
    from pipeline.protocol import run_all
    run_all(data_root=data_root, run_dir=run_dir, overrides={
        "teacher": teacher, "pretrained": pretrained, "student": student, "student_weights": student_weights,
        "student_size": student_size, "views": views, "steps": steps, "align_steps": align_steps,
        "per_domain": per_domain, "eval_every": eval_every}, methods=methods, seeds=seeds,
        holdouts=holdouts, workers=workers, force=force, cutmix=cutmix, preset=preset, pixel_cache=pixel_cache,
        jobs=jobs, teachers=teachers, rescan=rescan, log=log)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--format", "form", type=click.Choice(["markdown", "latex", "json"]), default="markdown",
              show_default=True, help="Output format (LaTeX: booktabs).")
def collect(runs, form):
    """Tables over several run folders: one per dataset and a cross-dataset summary; runs with
    another protocol (teacher, split seed, steps...) are kept apart, never averaged."""
    from pipeline.collect import FORMATS, collect as collect_runs
    click.echo(FORMATS[form](collect_runs(runs)), nl=False)


@main.command()
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None,
              help="Measure the papers' workload on this device, in absolute numbers (views/s, TFLOP/s, step "
                   "times, serving, peak memory); its defaults are the second ones below.")
@click.option("--teacher", default=None, help="open_clip model. Default: the demo teacher; --device: ViT-B-16.")
@click.option("--pretrained", default=None, help="open_clip tag or checkpoint file (default: random weights).")
@click.option("--student", default=None, help="timm model name. Default: test_resnet; --device: resnet50.")
@click.option("--student-weights", default=None, help="imagenet, none or a file. Default: none.")
@click.option("--student-size", type=POSITIVE, default=None, help="Student input size. Default: 64; --device: 224.")
@click.option("--images", type=POSITIVE, default=None,
              help="Images in the benchmark dataset. Default: 400 demo images; --device: 4000 500x375 JPEGs.")
@click.option("--views", type=POSITIVE, default=None, help="Views per image. Default: 4; --device: 8.")
@click.option("--batch-size", type=POSITIVE, default=None, help="Teacher batch (images). Default: 32; --device: 64.")
@click.option("--per-domain", type=POSITIVE, default=None,
              help="Images per source domain per step (3 source domains). Default: 16; --device: 32.")
@click.option("--steps", type=POSITIVE, default=None, help="Training steps timed. Default: 40; --device: 50.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Worker processes that decode and render. Default: up to 4; --device: every core.")
@click.option("--concurrency", default="4,16", show_default=True,
              help="With --device: requests in flight to the served teacher, one measurement each.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write JSON here.")
def bench(device, concurrency, json_path, **given):
    """Measure extraction efficiency, cached vs online step cost, align speed-up, teacher forwards
    and extraction memory, all in one run on this machine; with --device, the papers' models on
    that device."""
    from pipeline import bench as benchmark
    given = {k: v for k, v in given.items() if v is not None}
    given["pretrained"] = _none(given.get("pretrained"))
    if device is None:
        results = benchmark.bench(**{**benchmark.PRESET, **given})
        text = benchmark.render(results)
    else:
        try:
            levels = tuple(int(c) for c in concurrency.split(","))
        except ValueError:
            levels = ()
        if not levels or min(levels) < 1:
            raise UserError(f"--concurrency is a list of positive integers such as 4,16, got '{concurrency}'")
        benchmark.use_device(device)
        results = benchmark.device_bench(**{**benchmark.DEVICE_PRESET, **given, "concurrency": levels})
        text = benchmark.render_device(results)
    click.echo(text)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


@main.command("serve-teacher")
@click.option("--teacher", required=True, help="open_clip model name, or local-dir:PATH.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag, a local checkpoint file, or 'none'.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--model-name", default="teacher", show_default=True, help="The model's name in /v2/models/NAME.")
@click.option("--token-env", default="PIPELINE_TEACHER_TOKEN", show_default=True,
              help="Environment variable holding a bearer token that clients must send (unset: none).")
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Serve HTTPS with this certificate (PEM); with --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="The certificate's key.")
@click.option("--inject-faults", default=None, hidden=True, help="Testing only: 429=P,slow=P,slow_s=S,seed=N.")
def serve_teacher(teacher, pretrained, host, port, model_name, token_env, device, tls_cert, tls_key, inject_faults):
    """Serve an open_clip teacher on the Open Inference Protocol (KServe v2) for `extract --teacher URL`."""
    from pipeline.serve import serve
    serve(teacher, _none(pretrained), host=host, port=port, model_name=model_name, token_env=token_env,
          faults=inject_faults, device=device, tls_cert=tls_cert, tls_key=tls_key)


@main.command()
@RUN
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(run_dir, as_json):
    """What is cached, with which teacher, views and dataset, and which stages are stale."""
    from pipeline.info import describe, render
    report = describe(RunFolder(run_dir))
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


if __name__ == "__main__":
    main(prog_name=Path(sys.argv[0]).name)
