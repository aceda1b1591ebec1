"""Run tracking: a stage's curves and events, for TensorBoard or W&B, kept in the stage's own folder.

``start(backend, run, folder, config)`` gives a ``Tracker``: ``scalar(name, value, step)``,
``event(name, text, step)``, ``flush()`` (at each checkpoint, so what a resume keeps is on disk)
and ``close()``. The training loops call it and never ask which back-end it is; ``OFF`` does
nothing. The logs live in ``folder/tensorboard/`` or ``folder/wandb/``, beside the stage's
outputs but never among them (a manifest hashes only its outputs), so they never make a
finished stage stale, and a re-run or a resume of the stage appends to the same log:

- TensorBoard: one log directory per stage. The first step a process logs purges whatever
  earlier attempts logged from that step on (TensorBoard's ``purge_step``), so a resumed
  training shows each step once, and a recompute from step 1 replaces the old curves.
- W&B: the run id kept in ``folder/wandb/run-id`` is resumed. Offline (as
  ``WANDB_MODE=offline``: nothing leaves the machine; ``wandb sync`` uploads it later) unless
  ``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise.

Only the main process of a torchrun job logs.
"""
import importlib
import os
import secrets
import time
from pathlib import Path

from cache import atomic
from cache.errors import UserError
from stages.distributed import is_main

BACKENDS = ("none", "tensorboard", "wandb")
# Off unless asked: the same command writes the same files on every machine, whatever is installed.
DEFAULT = "none"
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
PROJECT = "clip-distill-pipeline"  # the W&B project unless WANDB_PROJECT names another


def require(backend: str):
    """The back-end's module (None for ``none``); one line naming the extra when it is missing."""
    if backend not in BACKENDS:
        raise UserError(f"--log must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "none":
        return None
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError:
        raise UserError(f"--log {backend} needs the {backend} package: pip install -e \".[track]\"") from None


class Tracker:
    """No tracking."""

    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def event(self, name: str, text: str, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


OFF = Tracker()


def start(backend: str, run, folder, config: dict) -> Tracker:
    """The tracker of the stage in ``folder`` of run folder ``run`` (``config``: the stage's settings)."""
    module = require(backend)
    if module is None or not is_main():
        return OFF
    if backend == "tensorboard":
        return TensorBoard(module, Path(folder) / "tensorboard")
    return WandB(module, Path(folder), name=run.rel(folder), group=run.root.name, config=config)


class TensorBoard(Tracker):
    """Event files in one log directory, through ``torch.utils.tensorboard``."""

    def __init__(self, module, log_dir: Path):
        self.module, self.log_dir, self.writer = module, log_dir, None

    def _writer(self, step: int):
        if self.writer is None:  # opened at the first step logged, which purges that step on
            _after_earlier_files(self.log_dir)
            self.writer = self.module.SummaryWriter(str(self.log_dir), purge_step=step)
        return self.writer

    def scalar(self, name, value, step):
        self._writer(step).add_scalar(name, value, step)

    def event(self, name, text, step):
        self._writer(step).add_text(name, text, step)

    def flush(self):
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _after_earlier_files(log_dir: Path) -> None:
    """TensorBoard reads a directory's event files in name order, and a name starts with its
    creation second: a new file must be named after the earlier attempts' files for its purge
    to apply to them (a resume within the same second waits for the next one)."""
    seconds = [int(p.name.split(".")[3]) for p in log_dir.glob("events.out.tfevents.*")]
    if seconds:
        time.sleep(max(0.0, min(max(seconds) + 1 - time.time(), 1.1)))


class WandB(Tracker):
    """A W&B run, resumed by the id kept in the stage folder."""

    def __init__(self, wandb, folder: Path, *, name: str, group: str, config: dict):
        id_file = folder / "wandb" / "run-id"
        if not id_file.exists():
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(id_file, secrets.token_hex(8).encode())
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT), dir=str(folder), id=id_file.read_text().strip(),
            resume="allow", name=name, group=group, config=config, mode=mode,
            # no console capture (the progress bars stay ours), no system-metrics thread, no git calls
            settings=wandb.Settings(console="off", x_disable_stats=True, disable_git=True, save_code=False,
                                    silent=True))

    def scalar(self, name, value, step):
        self.run.log({name: value}, step=step)

    def event(self, name, text, step):
        self.run.log({name: text}, step=step)

    def close(self):
        self.run.finish()
