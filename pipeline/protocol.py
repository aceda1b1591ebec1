"""`pipeline run`: leave-one-domain-out over every held-out domain, then the results table."""
import time

from data import demo
from pipeline import config, jobs
from pipeline.errors import UserError
from pipeline.runfolder import RunFolder

METHODS = ("zeroshot", "adip")


def run_all(*, data_root, run_dir, overrides: dict, holdouts, seed: int, workers: int, force: bool) -> str:
    settings = dict(config.REAL if data_root else config.DEMO)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    run = RunFolder(run_dir or config.DEMO_RUN)
    with run.writing():
        if data_root is None:
            data_root = run.root / "demo-data"
            demo.generate(data_root)
            jobs.say(f"run: built-in demo dataset in {data_root}")
        timings = {}
        started = time.time()
        jobs.extract(run, data_root, teacher=settings["teacher"], pretrained=settings["pretrained"],
                     views=settings["views"], view_seed=0, template_set="photo", val_fraction=0.2,
                     split_seed=0, batch_size=64, workers=workers, force=force)
        timings["extract"] = time.time() - started
        index = run.load_index()
        chosen = holdouts.split(",") if holdouts else index.domains
        for holdout in chosen:
            index.check_holdout(holdout)
        for holdout in chosen:
            jobs.say(f"run: held-out domain '{holdout}'")
            started = time.time()
            key = jobs.align(run, student=settings["student"], student_weights=settings["student_weights"],
                             student_size=settings["student_size"], holdout=holdout,
                             steps=settings["align_steps"], per_domain=settings["per_domain"],
                             lr=config.ADIP["lr"], lam=config.ADIP["lam"], seed=seed,
                             eval_every=settings["eval_every"], batch_size=128, workers=workers, force=force)
            timings["align"] = timings.get("align", 0) + time.time() - started
            started = time.time()
            jobs.distill(run, method="adip", holdout=holdout, student=key, steps=settings["steps"],
                         per_domain=settings["per_domain"], lr=config.ADIP["lr"], lam=config.ADIP["lam"],
                         seed=seed, eval_every=settings["eval_every"], workers=workers, force=force)
            timings["distill"] = timings.get("distill", 0) + time.time() - started
            started = time.time()
            for method in METHODS:
                result = jobs.evaluate(run, method=method, holdout=holdout, student=key, seed=seed,
                                       workers=workers, force=force)
                jobs.say(f"run: {method:>8} held-out '{holdout}': {100 * result['holdout_acc']:.1f}% "
                         f"(source val {100 * result['source_val_acc']:.1f}%)")
            timings["evaluate"] = timings.get("evaluate", 0) + time.time() - started
        table = jobs.results_table(run, list(METHODS), chosen)
        run.table.write_text(table)
    jobs.say("run: stage times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"\nHeld-out domain accuracy (%), teacher {settings['teacher'].split('/')[-1]}, "
          f"student {settings['student']}:\n")
    print(table)
    jobs.say(f"run: table saved to {run.table}; every result in {run.results}")
    return table
