"""Run tracking (``--log``): what TensorBoard and W&B receive, read back from their own files."""
import json
import struct
import sys

import pytest

from conftest import ALIGN, invoke

STUDENT = ("--student", "test_resnet", "--student-weights", "none", "--student-size", 32)


def distill(run, method, *options):
    student = () if method == "adip" else STUDENT  # adip takes the aligned student
    return invoke("distill", "--run", run, "--method", method, "--holdout", "sketch", *student,
                  "--per-domain", 2, "--workers", 0, *options)


def stage_folder(run, stage, method=None):
    return next((run / stage / method if method else run / stage).glob("*/sketch/seed0" if method else "*/sketch"))


def log_rows(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def tensorboard(folder) -> dict:
    """{tag: [(step, value)]} of the scalars, and {tag: [(step, text)]} of the texts, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
                                                 for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    return {**scalars, **texts}


def steps(series):
    return [step for step, _ in series]


@pytest.mark.parametrize("name", ["adip", "kd", "rise"])
def test_a_methods_terms_add_up_to_its_loss_and_a_changed_loss_reports_none(name):
    from stages.methods import METHODS
    from test_training_math import make, tiny_batch
    batch = tiny_batch(cutmix_=True)
    reported = make(METHODS[name]).update(batch)
    terms = {k: v for k, v in reported.items() if k != "loss"}
    assert len(terms) > 1 and reported["loss"] == pytest.approx(sum(terms.values()), abs=1e-6)

    class Doubled(METHODS[name]):
        def loss(self, outputs, b):
            return 2 * super().loss(outputs, b)

    # its parent's terms no longer add up to the loss: only the loss is reported
    assert make(Doubled).update(batch) == {"loss": pytest.approx(2 * reported["loss"])}


def test_tensorboard_has_every_step_its_loss_terms_lr_and_each_validation(run_copy):
    assert distill(run_copy, "rise", "--steps", 6, "--eval-every", 3, "--log", "tensorboard").exit_code == 0
    folder = stage_folder(run_copy, "distill", "rise")
    logged, rows = tensorboard(folder), log_rows(folder)
    assert steps(logged["train/loss"]) == [1, 2, 3, 4, 5, 6]
    for term in ("kd", "ce", "dist"):  # RISE's three weighted terms add up to the loss
        assert steps(logged[f"train/loss/{term}"]) == [1, 2, 3, 4, 5, 6]
    for step, loss in logged["train/loss"]:
        terms = sum(dict(logged[f"train/loss/{term}"])[step] for term in ("kd", "ce", "dist"))
        assert terms == pytest.approx(loss, abs=1e-5)
    # the logged steps are the training's: their mean over each validation window is log.jsonl's loss
    losses = [loss for _, loss in logged["train/loss"]]
    assert [sum(losses[:3]) / 3, sum(losses[3:]) / 3] == pytest.approx([r["loss"] for r in rows[:2]], abs=2e-5)
    # RISE's step decay: x0.1 after 80% of the steps, seen by the steps after it
    assert [lr for _, lr in logged["train/lr"]] == pytest.approx([1e-3] * 4 + [1e-4] * 2)
    assert steps(logged["train/images_per_s"]) == [1, 2, 3, 4, 5, 6]
    assert all(rate > 0 for _, rate in logged["train/images_per_s"])
    assert logged["val/source_acc"] == [(3, pytest.approx(rows[0]["source_val_acc"])),
                                        (6, pytest.approx(rows[1]["source_val_acc"]))]
    assert steps(logged["val/source_loss"]) == [3, 6]

    # the tracking files are no output: the stage stays fresh and a re-run logs nothing
    files = sorted((folder / "tensorboard").iterdir())
    again = distill(run_copy, "rise", "--steps", 6, "--eval-every", 3, "--log", "tensorboard")
    assert again.exit_code == 0 and "up to date" in again.output
    assert sorted((folder / "tensorboard").iterdir()) == files
    info = json.loads(invoke("info", "--run", run_copy, "--json").output)
    assert all(stage["state"] == "fresh" for stage in info["stages"])


def test_align_logs_both_terms_and_each_validation(run_copy):
    assert invoke("align", "--run", run_copy, "--holdout", "sketch", *ALIGN, "--log", "tensorboard").exit_code == 0
    folder = stage_folder(run_copy, "align")
    logged, rows = tensorboard(folder), log_rows(folder)
    for tag in ("train/loss", "train/loss/image", "train/loss/text", "train/lr", "train/images_per_s"):
        assert steps(logged[tag]) == list(range(1, 21)), tag
    assert logged["val/source_acc"] == [(10, pytest.approx(rows[0]["source_val_acc"])),
                                        (20, pytest.approx(rows[1]["source_val_acc"]))]
    assert logged["train/loss"][9][1] == pytest.approx(rows[0]["loss"], abs=1e-5)


def test_swad_segments_valley_and_the_averaged_models_accuracy(run_copy):
    assert invoke("align", "--run", run_copy, "--holdout", "sketch", *ALIGN).exit_code == 0
    assert distill(run_copy, "adip", "--steps", 6, "--eval-every", 2, "--log", "tensorboard").exit_code == 0
    folder = stage_folder(run_copy, "distill", "adip")
    logged, summary = tensorboard(folder), log_rows(folder)[-1]
    assert steps(logged["swad/segment"]) == steps(logged["val/source_acc"]) == [2, 4, 6]
    assert logged["swad/segment"][1][1].startswith("steps 1-4, validation loss")
    # the valley starts once three segments' losses have their minimum first (the official rule)
    assert ("swad/valley" in logged) == summary["swad_converged"]
    assert logged["val/swad_source_acc"] == [(6, pytest.approx(summary["swad_source_val_acc"]))]
    assert steps(logged["train/loss/image"]) == steps(logged["train/loss/text"]) == list(range(1, 7))


def test_a_resume_continues_the_same_log_without_repeating_a_step(run_copy, monkeypatch):
    from stages import methods
    options = ("--steps", 4, "--eval-every", 2, "--log", "tensorboard")
    assert distill(run_copy, "rise", *options).exit_code == 0
    folder = stage_folder(run_copy, "distill", "rise")
    undisturbed = tensorboard(folder)

    calls = {"n": 0}
    real_update = methods.Method.update

    def dies_at_step_4(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real_update(self, batch)

    monkeypatch.setattr(methods.Method, "update", dies_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        distill(run_copy, "rise", *options, "--force")
    # the recompute replaced the first curves; step 3 is logged, but the saved state is step 2's
    assert steps(tensorboard(folder)["train/loss"]) == [1, 2, 3]
    monkeypatch.setattr(methods.Method, "update", real_update)
    assert distill(run_copy, "rise", *options).exit_code == 0

    resumed = tensorboard(folder)
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one log, three processes
    for tag in ("train/loss", "train/loss/kd", "train/lr", "val/source_acc", "val/source_loss"):
        assert steps(resumed[tag]) == steps(undisturbed[tag]), tag
        assert [v for _, v in resumed[tag]] == pytest.approx([v for _, v in undisturbed[tag]], rel=1e-5), tag
    assert steps(resumed["train/loss"]) == [1, 2, 3, 4]


def wandb_records(path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): a LevelDB-style log (a 7-byte header,
    32 KiB blocks of chunks: crc32, length, type) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2
    data, records, pending, position = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path) -> dict:
    """{key: [(step, value)]} of every number (or text) logged in a W&B run file."""
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) or item.key
                if not key.startswith("_"):
                    history.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return history


@pytest.fixture
def no_wandb_account(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written in the home folder
        monkeypatch.setenv(name, str(tmp_path / name.lower()))


def test_wandb_runs_offline_in_the_stage_folder_and_resumes_its_run_id(run_copy, no_wandb_account):
    options = ("--steps", 3, "--eval-every", 1, "--log", "wandb")
    assert distill(run_copy, "rise", *options).exit_code == 0
    folder = stage_folder(run_copy, "distill", "rise")
    run_id = (folder / "wandb" / "run-id").read_text()
    first = list((folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(first) == 1
    history, rows = wandb_history(first[0]), log_rows(folder)[:-1]
    assert steps(history["train/loss"]) == [1, 2, 3]
    # validated every step: log.jsonl's loss is each step's loss
    assert [loss for _, loss in history["train/loss"]] == pytest.approx([r["loss"] for r in rows], abs=1e-5)
    assert history["val/source_acc"] == [(r["step"], pytest.approx(r["source_val_acc"])) for r in rows]
    assert steps(history["train/loss/dist"]) == steps(history["train/lr"]) == [1, 2, 3]

    assert distill(run_copy, "rise", *options, "--force").exit_code == 0  # a re-run: the same W&B run
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)
    assert (folder / "wandb" / "run-id").read_text() == run_id


@pytest.mark.parametrize("backend, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_logger_is_one_line_before_any_work(backend, module, run_copy, dataset, teacher_dir, tmp_path,
                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    expected = f'Error: --log {backend} needs the {backend} package: pip install -e ".[track]"'
    commands = [("distill", "--run", run_copy, "--method", "erm", "--holdout", "sketch", *STUDENT),
                ("align", "--run", run_copy, "--holdout", "sketch", *ALIGN),
                ("run", "--data", dataset, "--run", tmp_path / "new", "--teacher", f"local-dir:{teacher_dir}")]
    for command in commands:
        result = invoke(*command, "--log", backend)
        assert result.exit_code == 2 and result.output.strip() == expected, result.output
    assert not (run_copy / "distill").exists() and not (run_copy / "align").exists()
    assert not (tmp_path / "new").exists()


def test_tracking_changes_no_weights(run_copy, no_wandb_account):
    from cache.fingerprint import sha256_file

    def trained(backend):
        assert invoke("align", "--run", run_copy, "--holdout", "sketch", *ALIGN, "--force",
                      "--log", backend).exit_code == 0
        assert distill(run_copy, "adip", "--steps", 4, "--eval-every", 2, "--force", "--log", backend).exit_code == 0
        files = [stage_folder(run_copy, "align") / "projection.safetensors",
                 *(stage_folder(run_copy, "distill", "adip") / f"{name}.safetensors" for name in ("best", "swad"))]
        return [sha256_file(f) for f in files]

    untracked = trained("none")
    assert trained("tensorboard") == untracked
    assert trained("wandb") == untracked


def test_run_tracks_extraction_alignment_and_distillation(tmp_path, teacher_dir, dataset):
    run = tmp_path / "run"
    result = invoke("run", "--data", dataset, "--run", run, "--teacher", f"local-dir:{teacher_dir}",
                    "--pretrained", "none", *STUDENT, "--views", 2, "--steps", 2, "--align-steps", 4,
                    "--per-domain", 2, "--eval-every", 2, "--holdouts", "sketch", "--workers", 0,
                    "--methods", "adip", "--log", "tensorboard")
    assert result.exit_code == 0, result.output
    extraction = tensorboard(run / "extract")
    assert steps(extraction["extract/images_per_s"]) == [64, 80]  # by images cached: blocks of 64
    assert extraction["extract/teacher_queries"] == [(64, 128), (80, 160)]  # 2 views per image
    assert steps(tensorboard(stage_folder(run, "align"))["train/loss"]) == [1, 2, 3, 4]
    assert steps(tensorboard(stage_folder(run, "distill", "adip"))["val/source_acc"]) == [2]
