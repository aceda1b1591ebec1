"""`pipeline collect RUN...`: results of several run folders, one table per dataset and a
cross-dataset summary (DomainBed's collect_results). Runs are pooled only when they ran the same
protocol; runs of one dataset that differ are kept apart, each table named by what differs."""
import json
import math

from cache import jsonl, manifest
from cache.errors import UserError
from pipeline import report
from pipeline.protocol import variant_name
from stages.runfolder import RunFolder

# What must agree for results to be averaged together: the run's settings and its extraction.
PROTOCOL_SETTINGS = ("teacher", "pretrained", "student", "student_weights", "student_size", "views", "steps",
                     "align_steps", "per_domain", "eval_every", "align_lr")
EXTRACTION = ("split_seed", "val_fraction", "view_seed", "templates")
SELECTION = "training-domain validation"


def load(run_dir) -> dict:
    """One run folder: its dataset name (and where the name came from), protocol and results."""
    run = RunFolder(run_dir)
    if not run.protocol.exists():
        raise UserError(f"{run.root} has no protocol.json: run `pipeline run --run {run.root}` first")
    recorded = json.loads(run.protocol.read_text())
    extracted = manifest.load(run.extract_dir)
    if extracted is None:  # its split seed, teacher weights and dataset are unknown: never pooled blindly
        raise UserError(f"{run.root} has no readable extract/manifest.json: re-run `pipeline run --run {run.root}`")
    settings = recorded["settings"]
    fingerprint = extracted["inputs"].get("dataset", "")
    if settings.get("preset"):
        name, source = settings["preset"], "preset"
    elif settings.get("demo"):
        name, source = "demo", "built-in demo"
    else:
        name, source = f"dataset-{fingerprint[:12]}", "dataset fingerprint"
    protocol = {**{k: settings.get(k) for k in PROTOCOL_SETTINGS},
                **{k: extracted["config"].get(k) for k in EXTRACTION},
                "teacher_weights": extracted["inputs"].get("teacher_weights"), "dataset": fingerprint}
    results = jsonl.rows(run.results)
    units = [_unit(r) for r in results]
    twice = next((u for i, u in enumerate(units) if u in units[:i]), None)
    if twice is not None:  # a folder re-run with other settings: its rows do not say which is which
        raise UserError(f"{run.results} holds {twice[0]} held-out '{twice[1]}' seed {twice[2]} more than once "
                        f"(re-run with other settings?): collect runs whose folders ran one protocol")
    return {"run": str(run.root), "dataset": name, "named_by": source, "protocol": protocol,
            "holdouts": recorded["holdouts"], "results": results}


def group(runs: list) -> list:
    """Runs pooled by (dataset, protocol); say what keeps apart two groups of one dataset. The same
    (method, model, held-out domain, seed) in two pooled runs is refused: it would count twice."""
    groups = []
    for r in runs:
        same = next((g for g in groups if g["dataset"] == r["dataset"] and g["protocol"] == r["protocol"]), None)
        if same is None:
            groups.append({**r, "runs": [r["run"]], "results": list(r["results"])})
            continue
        seen = {_unit(x) for x in same["results"]}
        twice = next((x for x in r["results"] if _unit(x) in seen), None)
        if twice is not None:
            raise UserError(f"{r['run']} and {', '.join(same['runs'])} both hold {report.row_label(twice)} "
                            f"held-out '{twice['holdout']}' seed {twice['seed']}: collect each once")
        same["runs"].append(r["run"])
        same["results"] += r["results"]
        same["holdouts"] += [h for h in r["holdouts"] if h not in same["holdouts"]]
    for g in groups:
        others = [o for o in groups if o["dataset"] == g["dataset"] and o is not g]
        differs = sorted({k for o in others for k in g["protocol"] if o["protocol"][k] != g["protocol"][k]})
        g["name"] = g["dataset"] + (" (" + ", ".join(f"{k} {g['protocol'][k]}" for k in differs) + ")"
                                    if differs else "")
        if others:
            g["apart"] = (f"{g['name']}: {', '.join(g['runs'])} kept apart from other {g['dataset']} runs, "
                          f"which differ on {', '.join(differs)}")
    return groups


def _unit(result: dict) -> tuple:
    return report.row_label(result), result["holdout"], result["seed"]


def collect(run_dirs: list) -> dict:
    """Every table: per group the held-out accuracies, and the selected hyperparameters per row."""
    groups = group([load(d) for d in run_dirs])
    tables = []
    for g in groups:
        labels = list(dict.fromkeys(report.row_label(r) for r in g["results"]))
        chosen = {label: sorted({variant_name(r["hparams"]) for r in g["results"]
                                 if report.row_label(r) == label and r.get("hparams")}) for label in labels}
        tables.append({"name": g["name"], "named_by": g["named_by"], "runs": g["runs"], "holdouts": g["holdouts"],
                       "apart": g.get("apart"), "hparams": chosen,
                       "table": report.summarize(g["results"], labels, g["holdouts"])})
    labels = list(dict.fromkeys(label for t in tables for label in t["table"]))
    summary = {}
    for label in labels:
        cells = {t["name"]: t["table"][label]["average"] if label in t["table"] else (math.nan, math.nan, 0)
                 for t in tables}
        means = [c[0] for c in cells.values()]
        one_per_dataset = len({t["name"].split(" (")[0] for t in tables}) == len(tables)  # never two protocols
        cells["average"] = (sum(means) / len(means), math.nan, len(means)) \
            if one_per_dataset and not any(math.isnan(m) for m in means) else (math.nan, math.nan, 0)
        summary[label] = cells
    return {"selection": SELECTION, "tables": tables, "summary": summary, "columns": [t["name"] for t in tables]}


def markdown(collected: dict) -> str:
    parts = []
    for t in collected["tables"]:
        parts.append(f"## {t['name']} (named by its {t['named_by']}; {', '.join(t['runs'])})\n\n"
                     + (f"{t['apart']}\n\n" if t["apart"] else "")
                     + f"Model selection: {collected['selection']}. Held-out accuracy (%), mean ± SE over seeds.\n\n"
                     + report.markdown(t["table"], t["holdouts"],
                                       {k: ", ".join(v) for k, v in t["hparams"].items()}))
    parts.append(f"## Summary\n\nModel selection: {collected['selection']}. Average held-out accuracy (%).\n\n"
                 + report.markdown(collected["summary"], collected["columns"]))
    return "\n".join(parts)


def latex(collected: dict) -> str:
    """booktabs tables, one per dataset and the summary."""
    def table(caption, rows, columns, extra=None):
        head = ["method", *columns, "average"] + (["hyperparameters"] if extra else [])
        lines = [r"\begin{table}", r"\centering", rf"\caption{{{_tex(caption)}}}",
                 r"\begin{tabular}{l" + "c" * (len(columns) + 1) + ("l" if extra else "") + "}", r"\toprule",
                 " & ".join(_tex(h) for h in head) + r" \\", r"\midrule"]
        for label, cells in rows.items():
            values = [report.cell(*cells[c]).replace("±", r"$\pm$") for c in [*columns, "average"]]
            lines.append(" & ".join([_tex(label), *values] + ([_tex(extra.get(label, ""))] if extra else []))
                         + r" \\")
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", r"\end{table}"])

    parts = [table(f"{t['name']}: held-out accuracy (%), {collected['selection']}", t["table"], t["holdouts"],
                   {k: ", ".join(v) for k, v in t["hparams"].items()}) for t in collected["tables"]]
    parts.append(table(f"Summary, {collected['selection']}", collected["summary"], collected["columns"]))
    return "\n\n".join(parts) + "\n"


def _tex(text: str) -> str:
    return "".join("\\" + c if c in "&%$#_{}" else c for c in str(text))


def as_json(collected: dict) -> str:
    def cells(table):
        return {label: {col: {"mean": None if math.isnan(m) else m, "se": None if math.isnan(s) else s, "n": n}
                        for col, (m, s, n) in row.items()} for label, row in table.items()}
    return json.dumps({**collected, "tables": [{**t, "table": cells(t["table"])} for t in collected["tables"]],
                       "summary": cells(collected["summary"])}, indent=2) + "\n"


FORMATS = {"markdown": markdown, "latex": latex, "json": as_json}
