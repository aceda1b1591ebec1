"""A stage: one step of the pipeline that declares what it depends on and what it writes.

Every stage (extract, student features, align, distill, evaluate) is a ``Stage``: a folder in the
run folder, a ``config`` (its settings), ``inputs`` (fingerprints of what it reads: other stages'
outputs, the dataset, the teacher's weights), ``outputs`` (files it writes in its folder) and
``compute``, and the ``upstream`` stages it needs first (distill: the student pixel cache).
``run`` is the one place that decides: skip when the manifest says the stage is fresh, otherwise
check, bring the upstream stages up to date, forget the old record, compute, and write the new
manifest (the shape of a DVC stage).
"""
import fcntl
import json
import math
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save

from cache import atomic, manifest, store
from cache.errors import UserError
from cache.progress import say
from stages.distributed import barrier, is_main


class Stage:
    folder: Path
    force = False
    config: dict = {}
    inputs: dict = {}
    outputs: list = []

    def describe(self) -> str:
        """What the stage is, for messages: e.g. "align for held-out 'sketch' (resnet50...)"."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse bad settings before anything is forgotten (raise UserError)."""

    def upstream(self) -> list:
        """Stages whose outputs ``compute`` reads and that the runner brings up to date first."""
        return []

    def compute(self) -> dict | None:
        """Write the outputs into ``folder``; return the summary (None: another rank writes)."""
        raise NotImplementedError

    def published(self, summary: dict) -> None:
        """After the manifest is written: anything that must follow a finished stage."""

    def reconcile(self, summary: dict) -> None:
        """When skipped as fresh: redo what ``published`` did if a crash lost it."""

    def why_stale(self) -> str | None:
        """What the manifest says, or an HDF5 output that no longer opens whole (truncated, or not
        HDF5), which its recorded size and mtime may not show."""
        why = manifest.why_stale(self.folder, self.config, self.inputs)
        if why is None:
            why = next((f"{name} is not readable" for name in self.outputs
                        if name.endswith(".h5") and not store.readable(Path(self.folder) / name)), None)
        return why


@contextmanager
def holding(folder: Path):
    """The stage folder's lock: one writer per output. Another process that wants to write the
    same folder waits for it (then usually finds the stage fresh); other stages of the same run
    folder go on side by side. Under torchrun the job's rank 0 holds it for all its ranks."""
    if not is_main():
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another pipeline process writing {folder}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _skip(stage: Stage, quiet: bool) -> dict:
    if not quiet:
        say(f"{stage.describe()}: up to date; --force recomputes")
    summary = manifest.load(stage.folder)["summary"]
    stage.reconcile(summary)
    return summary


def run(stage: Stage, force: bool = False, quiet: bool = False) -> dict | None:
    """Run ``stage`` unless it is fresh; returns its summary (the recorded one when skipped)."""
    stage.force = force
    if not force and stage.why_stale() is None:
        return _skip(stage, quiet)
    with holding(stage.folder):
        if not force and stage.why_stale() is None:  # another process finished it while we waited
            return _skip(stage, quiet)
        return _recompute(stage)


def _recompute(stage: Stage) -> dict | None:
    stage.check()
    for before in stage.upstream():
        if is_main():  # under torchrun rank 0 computes it; the others read it once it is done
            run(before, quiet=True)
        barrier()
    Path(stage.folder).mkdir(parents=True, exist_ok=True)
    previous = manifest.invalidate(stage.folder)  # an interrupted recompute is never taken as fresh
    try:
        summary = stage.compute()
    except UserError:  # refused (a damaged input, a diverging loss): the finished record still holds
        manifest.restore(stage.folder, previous)
        raise
    if summary is None:
        return None
    manifest.write(stage.folder, stage.config, stage.inputs, stage.outputs, summary)
    stage.published(summary)
    return summary


def save_outputs(folder, weights: dict, config: dict, log: list) -> list:
    """Write ``{name}.safetensors`` per state dict, ``config.json`` and ``log.jsonl``; their names."""
    folder = Path(folder)
    for name, state in weights.items():
        atomic.write_bytes(folder / f"{name}.safetensors", save({k: v.contiguous() for k, v in state.items()}))
    atomic.write_bytes(folder / "config.json", json.dumps(config, indent=2).encode())
    atomic.write_bytes(folder / "log.jsonl", "".join(json.dumps(row) + "\n" for row in log).encode())
    return [f"{name}.safetensors" for name in weights] + ["config.json", "log.jsonl"]


def require_positive(**values) -> None:
    """Counts such as steps and batch sizes: positive integers."""
    for name, value in values.items():
        if value is None or value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def require_rates(hparams: dict) -> None:
    """Every rate, weight and temperature is finite; learning rates non-negative, temperatures positive."""
    for name, value in hparams.items():
        if value is None:
            continue
        if not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if (name == "lr" and value < 0) or (name == "temperature" and value <= 0):
            raise UserError(f"--{name} must be {'non-negative' if name == 'lr' else 'positive'}, got {value}")
