"""The run folder: one directory holding every cache and output of a run.

```
RUN/extract/                      index.parquet, teacher.h5, skipped.jsonl, manifest.json
RUN/features/<student>/           features.h5 (frozen student features of every view)
RUN/align/<student>/<holdout>/    projection.safetensors, config.json, log.jsonl
RUN/distill/<method>/<student>/<holdout>/seed<S>/   model.safetensors, config.json, log.jsonl
RUN/evaluate/<method>/<student>/<holdout>/seed<S>/  metrics.json
RUN/results.jsonl                 one JSON object per evaluation
RUN/table.md                      the results table of `pipeline run`
```
"""
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from cache.index import read_table
from data.domainbed import ImageIndex
from pipeline.distributed import is_main
from pipeline.errors import UserError


class RunFolder:
    def __init__(self, root):
        self.root = Path(root)

    def rel(self, path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    @property
    def extract(self) -> Path:
        return self.root / "extract"

    @property
    def teacher_store(self) -> Path:
        return self.extract / "teacher.h5"

    @property
    def index_path(self) -> Path:
        return self.extract / "index.parquet"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def table(self) -> Path:
        return self.root / "table.md"

    def features(self, student: str) -> Path:
        return self.root / "features" / student

    def align(self, student: str, holdout: str) -> Path:
        return self.root / "align" / student / holdout

    def distill(self, method: str, student: str, holdout: str, seed: int) -> Path:
        return self.root / "distill" / method / student / holdout / f"seed{seed}"

    def evaluate(self, method: str, student: str, holdout: str, seed: int) -> Path:
        return self.root / "evaluate" / method / student / holdout / f"seed{seed}"

    def load_index(self) -> ImageIndex:
        if not self.index_path.exists():
            raise UserError(f"{self.root} has no extracted cache; run `pipeline extract --data ROOT "
                            f"--run {self.root}` first")
        return ImageIndex.from_columns(*read_table(self.index_path))

    def aligned_students(self, holdout: str) -> list:
        """Student keys that have a finished alignment for ``holdout``."""
        base = self.root / "align"
        return sorted(p.parent.parent.name for p in base.glob(f"*/{holdout}/manifest.json")) if base.exists() else []

    def resolve_student(self, holdout: str, student: str | None) -> str:
        """The student key for ``holdout``: the only aligned one, or the one matching ``student``."""
        keys = self.aligned_students(holdout)
        if student:
            keys = [k for k in keys if k == student or k.startswith(student + "_")]
        if not keys:
            raise UserError(f"no finished alignment for held-out domain '{holdout}'"
                            f"{' and student ' + student if student else ''} in {self.root}; "
                            f"run `pipeline align --run {self.root} --student NAME --holdout {holdout}` first")
        if len(keys) > 1:
            raise UserError(f"several aligned students for '{holdout}': {', '.join(keys)}; pick one with --student")
        return keys[0]

    @contextmanager
    def writing(self):
        """Hold the run folder's lock: a second writer gets a clear refusal, not a mixed cache.

        Under torchrun the job's rank 0 holds it for all its ranks."""
        if not is_main():
            yield self
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / ".lock", "w")
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.root}: {e.strerror}")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another pipeline process is writing {self.root}; wait for it or use another --run")
        try:
            handle.write(str(os.getpid()))
            handle.flush()
            yield self
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
