"""`pipeline collect`: tables over several run folders, pooled only under one protocol."""
import json

from click.testing import CliRunner

from pipeline.cli import main

HOLDOUTS = ["a", "b"]


def write_run(folder, accs: dict, split_seed=0, seeds=(0,), preset=None):
    """A finished run folder as `pipeline run` leaves it: protocol.json, the extract manifest and
    results.jsonl rows, ``accs`` being (method, holdout, seed) -> held-out accuracy."""
    (folder / "extract").mkdir(parents=True)
    settings = {"teacher": "t", "student": "s", "steps": 10, "demo": preset is None,
                **({"preset": preset} if preset else {})}
    (folder / "protocol.json").write_text(json.dumps({"settings": settings, "holdouts": HOLDOUTS,
                                                      "seeds": list(seeds), "sweeps": []}))
    (folder / "extract" / "manifest.json").write_text(json.dumps(
        {"config": {"split_seed": split_seed}, "inputs": {"dataset": "d" * 64, "teacher_weights": "w"},
         "outputs": {}}))
    rows = [{"method": m, "model": "best", "holdout": h, "seed": s, "holdout_acc": acc,
             "hparams": {"lr": 0.001} if m == "erm" else None} for (m, h, s), acc in accs.items()]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def collect(*args):
    return CliRunner().invoke(main, ["collect", *map(str, args)])


def test_collect_pools_seeds_of_one_protocol(tmp_path):
    write_run(tmp_path / "r0", {("erm", "a", 0): 0.5, ("erm", "b", 0): 0.7})
    write_run(tmp_path / "r1", {("erm", "a", 1): 0.7, ("erm", "b", 1): 0.9})
    result = collect(tmp_path / "r0", tmp_path / "r1", "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [t["name"] for t in out["tables"]] == ["demo"]
    erm = out["tables"][0]["table"]["erm"]
    assert erm["a"]["mean"] == 60.0 and round(erm["a"]["se"], 6) == 10.0 and erm["a"]["n"] == 2
    assert erm["average"]["mean"] == 70.0 and erm["average"]["n"] == 2  # per-seed averages 60 and 80
    assert out["tables"][0]["hparams"]["erm"] == ["lr0.001"]
    assert out["summary"]["erm"]["average"]["mean"] == 70.0


def test_collect_keeps_another_split_seed_apart(tmp_path):
    write_run(tmp_path / "r0", {("erm", "a", 0): 0.5, ("erm", "b", 0): 0.7})
    write_run(tmp_path / "r1", {("erm", "a", 0): 0.9, ("erm", "b", 0): 0.9}, split_seed=1)
    result = collect(tmp_path / "r0", tmp_path / "r1")
    assert result.exit_code == 0, result.output
    assert "## demo (split_seed 0)" in result.output and "## demo (split_seed 1)" in result.output
    assert "differ on split_seed" in result.output
    assert "| erm | 50.0 | 70.0 | 60.0 | lr0.001 |" in result.output  # never mixed with the other
    assert "| erm | 60.0 | 90.0 | - |" in result.output  # the summary: no average over two protocols


def test_collect_summary_across_datasets_and_latex(tmp_path):
    write_run(tmp_path / "p", {("erm", "a", 0): 0.5, ("erm", "b", 0): 0.7}, preset="pacs")
    write_run(tmp_path / "v", {("erm", "a", 0): 0.8, ("erm", "b", 0): 1.0}, preset="vlcs")
    result = collect(tmp_path / "p", tmp_path / "v")
    assert "| erm | 60.0 | 90.0 | 75.0 |" in result.output
    latex = collect(tmp_path / "p", tmp_path / "v", "--format", "latex").output
    assert r"\toprule" in latex and r"\bottomrule" in latex and "erm & 60.0 & 90.0 & 75.0" in latex


def test_collect_refuses_a_run_given_twice_and_a_folder_without_a_run(tmp_path):
    write_run(tmp_path / "r0", {("erm", "a", 0): 0.5, ("erm", "b", 0): 0.7})
    twice = collect(tmp_path / "r0", tmp_path / "r0")
    assert twice.exit_code == 2 and "collect each once" in twice.output
    (tmp_path / "empty").mkdir()
    missing = collect(tmp_path / "empty")
    assert missing.exit_code == 2 and "no protocol.json" in missing.output
    with open(tmp_path / "r0" / "results.jsonl", "a") as f:  # the folder re-run with other settings
        f.write(json.dumps({"method": "erm", "model": "best", "holdout": "a", "seed": 0, "holdout_acc": 0.9}) + "\n")
    rerun = collect(tmp_path / "r0")
    assert rerun.exit_code == 2 and "more than once" in rerun.output
    (tmp_path / "r0" / "extract" / "manifest.json").unlink()
    unknown = collect(tmp_path / "r0")
    assert unknown.exit_code == 2 and "no readable extract/manifest.json" in unknown.output
