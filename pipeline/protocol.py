"""`pipeline run`: leave-one-domain-out over every held-out domain, method and seed, from one
extraction, then the results table."""
import json
import time

from data import demo
from pipeline import config, jobs, manifest, report
from pipeline.errors import UserError
from pipeline.runfolder import RunFolder
from stages.methods import METHODS

DEFAULT_METHODS = ("zeroshot", "probe", "erm", "kd", "rise", "adip")


def parse_list(text: str, name: str) -> list:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise UserError(f"--{name} needs at least one value")
    return values


def run_all(*, data_root, run_dir, overrides: dict, methods: str | None, seeds: str, holdouts,
            workers: int, force: bool, cutmix: float = 0.0) -> str:
    settings = dict(config.REAL if data_root else config.DEMO)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    chosen_methods = parse_list(methods, "methods") if methods else list(DEFAULT_METHODS)
    unknown = [m for m in chosen_methods if m not in jobs.ALL_METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(jobs.ALL_METHODS)}")
    try:
        seed_list = [int(s) for s in parse_list(seeds, "seeds")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got '{seeds}'")
    run = RunFolder(run_dir or config.DEMO_RUN)
    timings = {}

    def timed(stage, fn, **kwargs):
        started = time.time()
        try:
            return fn(run, **kwargs)
        finally:
            timings[stage] = timings.get(stage, 0.0) + time.time() - started

    with run.writing():
        if data_root is None:
            data_root = run.root / "demo-data"
            demo.generate(data_root)
            jobs.say(f"run: built-in demo dataset in {data_root}")
        timed("extract", jobs.extract, data_root=data_root, teacher=settings["teacher"],
              pretrained=settings["pretrained"], views=settings["views"], view_seed=0, template_set="photo",
              val_fraction=0.2, split_seed=0, batch_size=64, workers=workers, force=force)
        index = run.load_index()
        chosen = parse_list(holdouts, "holdouts") if holdouts else index.domains
        for holdout in chosen:
            index.check_holdout(holdout)
        student = {"student": settings["student"], "student_weights": settings["student_weights"],
                   "student_size": settings["student_size"]}
        train = {"steps": settings["steps"], "per_domain": settings["per_domain"],
                 "eval_every": settings["eval_every"], "workers": workers, "force": force}
        official, results = 0, []
        for holdout in chosen:
            jobs.say(f"run: held-out domain '{holdout}'")
            n_sources = len(index.domains) - 1
            for seed in seed_list:
                key = None  # this run's student, so other students in the run folder are never mixed in
                if "adip" in chosen_methods:
                    key = timed("align", jobs.align, **student, holdout=holdout, steps=settings["align_steps"],
                          per_domain=settings["per_domain"], lr=settings["align_lr"], lam=config.ADIP["lam"],
                          seed=seed, eval_every=settings["eval_every"], batch_size=128, workers=workers,
                          force=force)
                for method in chosen_methods:
                    if method == "zeroshot" and seed != seed_list[0]:
                        continue  # no randomness: one evaluation serves every seed
                    if method == "probe":  # a linear problem on the cache, like align
                        timed("distill", jobs.distill, method=method, holdout=holdout, seed=seed,
                              **{**train, "steps": settings["align_steps"]})
                    elif method != "zeroshot":
                        trained = timed("distill", jobs.distill, method=method, holdout=holdout,
                                        **{**student, "student": key if method == "adip" else student["student"]},
                                        seed=seed, cutmix=cutmix, hparams={"lr": settings["lr"].get(method)}, **train)
                        key = trained if method not in ("sd", "probe") else key
                    models = ["best"]
                    if method in METHODS and METHODS[method].swad_default:
                        models.append("swad")
                    for model in models:
                        result = timed("evaluate", jobs.evaluate, method=method, holdout=holdout,
                                       student=key if method not in ("sd", "probe") else None,
                                       seed=seed, model=model, workers=workers, force=force)
                        results.append(result)
                        jobs.say(f"run: {report.row_label(result):>12} held-out '{holdout}' seed {seed}: "
                                 f"{100 * result['holdout_acc']:.1f}% (source val {100 * result['source_val_acc']:.1f}%)")
                    official += report.official_teacher_forwards(
                        method, steps=settings["steps"], align_steps=settings["align_steps"],
                        batch=settings["per_domain"] * n_sources)
        labels = []
        for m in chosen_methods:
            labels.append(m)
            if m in METHODS and METHODS[m].swad_default:
                labels.append(m + " +SWAD")
        table = report.summarize(results, labels, chosen)  # this run's results only
        ours = manifest.load(run.extract)["summary"].get("teacher_image_forwards", 0)
        footer = (f"\nTeacher image forwards: {ours:,} in this run (one extraction); the official "
                  f"online-teacher code would use {official:,} for the same protocol "
                  f"(steps x batch x stages x held-out domains x seeds).\n")
        text = report.markdown(table, chosen) + footer
        run.table.write_text(text)
        plotted = report.bar_chart(table, chosen, run.table.with_suffix(".png"))
        (run.root / "protocol.json").write_text(json.dumps(
            {"methods": chosen_methods, "seeds": seed_list, "holdouts": chosen, "settings": settings,
             "official_teacher_forwards": official, "teacher_image_forwards": ours}, indent=2))
    jobs.say("run: stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"\nHeld-out domain accuracy (%), mean ± standard error over seeds {','.join(map(str, seed_list))}; "
          f"teacher {settings['teacher'].split('/')[-1]}, student {settings['student']}:\n")
    print(text)
    jobs.say(f"run: table saved to {run.table}" + (f" and {run.table.with_suffix('.png')}" if plotted else "")
             + f"; every result in {run.results}")
    return text
