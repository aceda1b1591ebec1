"""Long loops: progress bars, one-line messages, and a clean stop on Ctrl-C."""
import os
import signal
import sys
import threading

from tqdm import tqdm


def progress(**kwargs):
    """A progress bar that stays quiet when output is not a terminal."""
    return tqdm(disable=not sys.stderr.isatty(), dynamic_ncols=True, leave=False, **kwargs)


def say(message: str) -> None:
    """A status line on stderr, once per job (rank 0 only under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT: stopped cleanly at a safe point; everything written so far is kept."""


class StopFlag:
    """While active, SIGINT only sets ``requested``; the loop stops at its next safe point."""

    def __init__(self):
        self.requested, self._previous = False, None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def ignore_sigint(worker_id: int = 0) -> None:
    """DataLoader worker init: Ctrl-C is the main process's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
