"""`pipeline info`: what a run folder holds and which stages are stale."""
import json

from cache import manifest, store
from cache.errors import UserError
from cache.teacher_cache import DESCRIBED_KEYS


def describe(run) -> dict:
    if not run.root.is_dir():
        raise UserError(f"run folder not found: {run.root}")
    report = {"run": str(run.root), "cache": None, "dataset": None, "stages": [], "files": {}}
    if run.teacher_cache.exists():
        attrs = store.read_attrs(run.teacher_cache)
        report["cache"] = {k: attrs.get(k) for k in DESCRIBED_KEYS}
        report["cache"]["datasets"] = {name: {"shape": list(s), "dtype": d}
                                       for name, (s, d) in store.shapes(run.teacher_cache).items()}
    if run.index_path.exists():
        index = run.load_index()
        skipped = [s for s in index.status or [] if s != "ok"]
        report["dataset"] = {"root": str(index.root), "domains": index.domains, "classes": index.classes,
                             "images": len(index), "skipped": len(skipped),
                             "per_domain": {d: int((index.domain == i).sum()) for i, d in enumerate(index.domains)}}
    report["teachers"] = {name: {k: store.read_attrs(path).get(k) for k in ("teacher", "pretrained", "logit_scale")}
                          for name, path in run.extracted_teachers().items()}
    extract = manifest.load(run.extract_dir)
    report["teacher_image_forwards"] = extract["summary"].get("teacher_image_forwards") if extract else 0
    queries = run.queries  # a remote teacher's ledger, also while unfinished
    report["teacher_queries"] = json.loads(queries.read_text()) if queries.exists() else None
    for path in sorted(run.root.rglob(manifest.MANIFEST)):
        stage_dir = path.parent
        recorded = manifest.load(stage_dir)
        if recorded is None:
            report["stages"].append({"stage": run.rel(stage_dir), "finished": None, "state": "stale",
                                     "changed_inputs": [], "missing_outputs": [], "unreadable": True})
            continue
        stale = manifest.stale_inputs(run.root, stage_dir)
        missing = [n for n in recorded["outputs"] if not (stage_dir / n).exists()]
        report["stages"].append({"stage": run.rel(stage_dir), "finished": recorded["finished"],
                                 "state": "stale" if stale or missing or recorded.get("recomputing") else "fresh",
                                 "changed_inputs": stale, "missing_outputs": missing})
    for path in sorted(p for p in run.root.rglob("*") if p.is_file() and p.suffix in (".h5", ".parquet", ".safetensors", ".jsonl")):
        report["files"][run.rel(path)] = path.stat().st_size
    return report


def render(report: dict) -> str:
    lines = [f"run folder: {report['run']}"]
    if report["dataset"]:
        d = report["dataset"]
        lines.append(f"dataset:    {d['root']}: {d['images']} images ({d['skipped']} skipped), "
                     f"{len(d['classes'])} classes, domains " +
                     ", ".join(f"{k} ({v})" for k, v in d["per_domain"].items()))
    if report["cache"]:
        c = report["cache"]
        lines.append(f"teacher:    {c['teacher']} pretrained={c['pretrained']} "
                     f"checkpoint sha256 {str(c['checkpoint_sha256'])[:16]}; logits "
                     f"{c['logit_scale'] if c['logit_scale'] is not None else 100:g} x cos + {c['logit_bias'] or 0:g}")
        for name, other in list(report["teachers"].items())[1:]:
            lines.append(f"also:       {name}: {other['teacher']} pretrained={other['pretrained']} "
                         f"(RUN/extract/teachers/{name}; --teachers {name})")
        lines.append(f"views:      {c['views']} per image, seed {c['view_seed']}; templates "
                     f"'{c['template_set']}' ({len(c['templates'])})")
        lines.append(f"format:     version {c['format_version']}; " + ", ".join(
            f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in c["datasets"].items()))
        lines.append(f"teacher image forwards: {report['teacher_image_forwards']:,} (extraction; no stage after it "
                     f"runs the teacher)")
        if report.get("teacher_queries"):
            q = report["teacher_queries"]
            lines.append(f"teacher queries: {q['sent']:,} sent ({q['image']:,} image views, {q['text']:,} prompts), "
                         f"{q['retried']:,} retried, {q['failed']:,} failed (remote teacher, all runs)")
    else:
        lines.append("teacher:    nothing extracted yet")
    lines.append("stages:")
    for s in report["stages"]:
        why = ""
        if s["changed_inputs"]:
            why = " (changed: " + ", ".join(s["changed_inputs"]) + ")"
        if s["missing_outputs"]:
            why += " (missing: " + ", ".join(s["missing_outputs"]) + ")"
        lines.append(f"  {s['state']:<6} {s['stage']}{why}  [{s['finished']}]")
    if report["files"]:
        total = sum(report["files"].values())
        lines.append(f"files:      {len(report['files'])} data files, {total / 1e6:.1f} MB in all")
        for name, size in report["files"].items():
            lines.append(f"  {size / 1e6:9.2f} MB  {name}")
    return "\n".join(lines)
