"""Independent stages of one run folder run side by side, with the results of running them in turn."""
import hashlib
import os
import shutil
import subprocess
import sys

from conftest import invoke

DISTILL = ("--holdout", "photo", "--student", "test_resnet", "--student-weights", "none", "--student-size", 32,
           "--steps", 4, "--per-domain", 2, "--eval-every", 2, "--workers", 0)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(run) -> dict:
    return {p.relative_to(run).as_posix(): _digest(p) for p in sorted(run.glob("distill/**/best.safetensors"))}


def test_two_distills_and_an_evaluate_at_once(run_copy, tmp_path):
    in_turn = tmp_path / "in-turn"
    shutil.copytree(run_copy, in_turn, copy_function=shutil.copy2)
    commands = [("distill", "--run", "{run}", "--method", "erm", *DISTILL),
                ("distill", "--run", "{run}", "--method", "kd", *DISTILL),
                ("evaluate", "--run", "{run}", "--method", "zeroshot", "--holdout", "photo")]
    for command in commands:
        result = invoke(*[str(a).format(run=in_turn) for a in command])
        assert result.exit_code == 0, result.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    processes = [subprocess.Popen([sys.executable, "-m", "pipeline", *[str(a).format(run=run_copy) for a in command]],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                 for command in commands]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert _weights(run_copy) == _weights(in_turn) and len(_weights(run_copy)) == 2
    rows = (run_copy / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"method": "zeroshot"' in rows[0]


def test_run_with_two_jobs_gives_the_same_table(tmp_path, dataset, teacher_dir):
    def run(jobs):
        folder = tmp_path / f"jobs{jobs}"
        result = invoke("run", "--data", dataset, "--run", folder, "--teacher", f"local-dir:{teacher_dir}",
                        "--views", 2, "--student", "test_resnet", "--student-weights", "none", "--student-size", 32,
                        "--methods", "zeroshot,erm", "--seeds", "0,1", "--holdouts", "photo,sketch", "--steps", 3,
                        "--per-domain", 2, "--eval-every", 3, "--workers", 0, "--jobs", jobs)
        assert result.exit_code == 0, result.output
        return (folder / "table.md").read_text()

    assert run(2) == run(1)
