"""The run folder: one directory holding every cache and output of a run.

```
RUN/extract/                      index.parquet, teacher.h5, skipped.jsonl [queries.json, received.npz]
RUN/extract/shards/               rank<r>-of-<N>.h5 [+ .skipped.jsonl] (torchrun extraction)
RUN/extract/teachers/<name>/      the same, for every other teacher extracted into the run folder
RUN/features/<student>/           features.h5 (frozen student features of every view), student.json
RUN/pixels/<size>px-<interp>/     pixels.h5 (every view rendered at a student's input size)
RUN/align/<student>/<holdout>/    projection.safetensors, config.json, log.jsonl
RUN/distill/<method>/<student>/<holdout>/seed<S>/   best.safetensors [swad.safetensors], config.json, log.jsonl
RUN/evaluate/<method>[+swad]/<student>/<holdout>/seed<S>/  metrics.json
RUN/results.jsonl                 one JSON object per evaluation
RUN/table.md, table.png          the results table of `pipeline run`
RUN/protocol.json                 what `pipeline run` ran: methods, seeds, settings, sweeps
RUN/demo-data/                    the built-in demo dataset (`pipeline run` without --data)
RUN/with/<name>[+<name>...]/      align/, distill/, evaluate/ trained against another teacher or an
                                  ensemble (``--teachers``); features and pixels are shared
```

Every stage folder also holds its ``manifest.json`` (``cache/manifest.py``). This module is the
one place that names these paths; stages and commands ask it.
"""
import copy
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from cache import manifest, store
from cache.errors import UserError
from cache.index import read_table
from data.domainbed import ImageIndex


class RunFolder:
    """``teachers``: the names of the extracted teachers that later stages train and score against
    (their ensemble when several); None: the run folder's first teacher (``RUN/extract/``)."""

    def __init__(self, root, teachers: tuple | None = None, extract_dir=None):
        self.root = Path(root)
        self.teachers = teachers
        self._extract = Path(extract_dir) if extract_dir else self.root / "extract"
        self._index = None  # (stat key, ImageIndex) of the last index read

    def rel(self, path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    @property
    def extract_dir(self) -> Path:
        return self._extract

    # ---------------------------------------------------------------- teachers

    def extracted_teachers(self) -> dict:
        """name -> teacher.h5 of every teacher extracted here, the first one first."""
        first = self.root / "extract" / "teacher.h5"
        found = {teacher_name(store.read_attrs(first)): first} if first.exists() else {}
        for path in sorted((self.root / "extract" / "teachers").glob("*/teacher.h5")):
            found[path.parent.name] = path
        return found

    def extraction_of(self, name: str) -> "RunFolder":
        """The run folder as an extraction of teacher ``name`` sees it: ``RUN/extract/`` for the first
        teacher (or when nothing is extracted yet), ``RUN/extract/teachers/<name>/`` for any other."""
        try:
            extracted = self.extracted_teachers()
        except UserError:  # the first teacher's cache is unreadable: its extraction rebuilds it
            return RunFolder(self.root)
        if not extracted or next(iter(extracted)) == name:
            return RunFolder(self.root)
        return RunFolder(self.root, extract_dir=self.root / "extract" / "teachers" / name)

    @property
    def holds_first_teacher(self) -> bool:
        """Whether this extraction is the run folder's first teacher's (``RUN/extract/``)."""
        return self._extract == self.root / "extract"

    def using(self, teachers: list | None) -> "RunFolder":
        """This run folder with later stages against ``teachers`` (names or the specs they were
        extracted with; several: their ensemble)."""
        if not teachers:
            return RunFolder(self.root)
        extracted = self.extracted_teachers()
        names = []
        for wanted in teachers:
            name = next((n for n, path in extracted.items() if wanted in (n, *teacher_specs(store.read_attrs(path)))),
                        None)
            if name is None:
                raise UserError(f"no teacher '{wanted}' is extracted in {self.root}; extracted: "
                                f"{', '.join(extracted) or 'none'} (`pipeline extract --teacher ... --run {self.root}`)")
            if name in names:
                raise UserError(f"--teachers names {name} more than once; give each teacher once")
            names.append(name)
        first = next(iter(extracted))
        return RunFolder(self.root) if names == [first] else RunFolder(self.root, tuple(sorted(names)))

    @property
    def _derived(self) -> Path:
        """Where the stages trained against the chosen teachers live."""
        return self.root if self.teachers is None else self.root / "with" / "+".join(self.teachers)

    def teachers_input(self) -> dict:
        """The finished caches of the chosen teachers, as inputs of a later stage."""
        if self.teachers is None:
            return self.teacher_cache_input()
        extracted = self.extracted_teachers()
        return {k: v for name in self.teachers for k, v in
                RunFolder(self.root, extract_dir=extracted[name].parent).teacher_cache_input().items()}

    def load_teacher(self):
        """The chosen teachers' cache (``TeacherCache``), or their ensemble."""
        from cache.teacher_cache import TeacherCache, ensemble
        if self.teachers is None:
            return TeacherCache(self.teacher_cache)
        extracted = self.extracted_teachers()
        caches = [TeacherCache(extracted[name]) for name in self.teachers]
        return caches[0] if len(caches) == 1 else ensemble(caches, list(self.teachers))

    @property
    def teacher_label(self) -> str | None:
        """How results name the chosen teachers (None: the run's first teacher)."""
        return None if self.teachers is None else "+".join(self.teachers)

    @property
    def teacher_cache(self) -> Path:
        return self.extract_dir / "teacher.h5"

    @property
    def index_path(self) -> Path:
        return self.extract_dir / "index.parquet"

    def shard(self, rank: int, world: int) -> Path:
        """One rank's part of the teacher cache under torchrun."""
        return self.extract_dir / "shards" / f"rank{rank}-of-{world}.h5"

    def skipped_list(self, store=None) -> Path:
        """The skipped images of the teacher cache, or of one of its shards (``store``)."""
        if store is None or Path(store).parent == self.extract_dir:
            return self.extract_dir / "skipped.jsonl"
        return Path(store).with_name(Path(store).stem + ".skipped.jsonl")

    @property
    def queries(self) -> Path:
        """A remote teacher's query ledger."""
        return self.extract_dir / "queries.json"

    @property
    def received(self) -> Path:
        """Embeddings a remote teacher sent for a block not yet finished."""
        return self.extract_dir / "received.npz"

    def pixels_dir(self, spec_key: str) -> Path:
        return self.root / "pixels" / spec_key

    @property
    def protocol(self) -> Path:
        return self.root / "protocol.json"

    @property
    def demo_data(self) -> Path:
        return self.root / "demo-data"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def table(self) -> Path:
        return self.root / "table.md"

    def features_dir(self, student: str) -> Path:
        return self.root / "features" / student

    def aligned_student_description(self, student: str) -> dict:
        """The description (model, weights, size) of a student whose features were cached."""
        return json.loads((self.features_dir(student) / "student.json").read_text())

    def align_dir(self, student: str, holdout: str) -> Path:
        return self._derived / "align" / student / holdout

    def distill_dir(self, method: str, student: str, holdout: str, seed: int, variant: str | None = None) -> Path:
        """``variant`` names one point of a hyperparameter sweep (``seed0-<variant>``)."""
        return self._derived / "distill" / method / student / holdout / (f"seed{seed}" + (f"-{variant}" if variant else ""))

    def evaluation_dir(self, label: str, student: str, holdout: str, seed: int, variant: str | None = None) -> Path:
        return self._derived / "evaluate" / label / student / holdout / (f"seed{seed}" + (f"-{variant}" if variant else ""))

    def output_hash(self, path) -> str | None:
        """Fingerprint of a finished stage's output file (None if missing or unrecorded). A later stage
        reads only what its producer recorded: a file that changed since (damaged, or edited by hand)
        is refused, naming what to run, before anything is recomputed or forgotten."""
        digest = manifest.output_hash(self.root, self.rel(path))
        if digest is not None and digest != manifest.load(Path(path).parent)["outputs"][Path(path).name]["sha256"]:
            raise UserError(f"{path} is damaged or was changed by hand (it differs from what its stage "
                            f"recorded); {store.repair_hint(path)}")
        return digest

    def teacher_cache_input(self) -> dict:
        """The finished teacher cache as an input of a later stage."""
        digest = self.output_hash(self.teacher_cache)
        if digest is None:
            raise UserError(f"{self.root} has no finished extraction; run `pipeline extract --data ROOT "
                            f"--run {self.root}` first")
        return {self.rel(self.teacher_cache): digest}

    def load_index(self) -> ImageIndex:
        """The image index, read once per command: kept while the file's (size, mtime, inode) stay the
        same, so a rewritten index is read again. Each call gets its own shallow copy: reassigning an
        attribute (``index.status = ...``) leaves the kept one alone; its columns are shared, not to be
        changed in place."""
        try:
            st = self.index_path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"{self.root} has no extracted cache; run `pipeline extract --data ROOT "
                            f"--run {self.root}` first") from None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        if self._index is None or self._index[0] != key:
            self._index = key, ImageIndex.from_columns(*read_table(self.index_path, arrow=True))
        return copy.copy(self._index[1])

    def _finished_students(self, pattern: str, position: int) -> list:
        """Student keys of finished stages: path part ``position`` of each manifest matching ``pattern``."""
        return sorted(p.relative_to(self._derived).parts[position] for p in self._derived.glob(pattern))

    @staticmethod
    def _pick_student(keys: list, student: str | None, missing: str, several: str) -> str:
        """The only key, or the one matching ``student`` (a key or a model name)."""
        if student:
            keys = [k for k in keys if k == student or k.startswith(student + "_")]
        if not keys:
            raise UserError(missing)
        if len(keys) > 1:
            raise UserError(f"{several}: {', '.join(keys)}; pick one with --student")
        return keys[0]

    def aligned_student(self, holdout: str, student: str | None) -> str:
        """The student key aligned for ``holdout``."""
        return self._pick_student(
            self._finished_students(f"align/*/{holdout}/manifest.json", 1), student,
            missing=f"no finished alignment for held-out domain '{holdout}'"
                    f"{' and student ' + student if student else ''} in {self.root}; "
                    f"run `pipeline align --run {self.root} --student NAME --holdout {holdout}` first",
            several=f"several aligned students for '{holdout}'")

    def trained_student(self, method: str, holdout: str, student: str | None, seed: int,
                        variant: str | None = None) -> str:
        """The student key of a finished ``method`` run for ``holdout`` and ``seed`` (and sweep ``variant``)."""
        folder = self.distill_dir(method, "*", holdout, seed, variant).relative_to(self._derived).as_posix()
        return self._pick_student(
            self._finished_students(f"{folder}/manifest.json", 2), student,
            missing=f"no trained {method} model for held-out '{holdout}', seed {seed} in {self.root}; run "
                    f"`pipeline distill --run {self.root} --method {method} --holdout {holdout}` first",
            several=f"several {method} students for '{holdout}'")

    @contextmanager
    def writing(self):
        """Open the run folder for writing (created if missing), with a clear error if it cannot be.

        There is no lock on the whole folder: each stage locks its own folder while it writes
        (``stages.stage.run``), so independent trainings and evaluations run side by side."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".writable-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.root}: {e.strerror}")
        yield self


def teacher_name(attrs: dict) -> str:
    """A teacher's short name in a run folder: a local folder's name, an hf-hub repository's
    name, a served model's name, or the open_clip name with its pretrained tag."""
    teacher, pretrained = str(attrs["teacher"]), attrs.get("pretrained")
    if teacher.startswith("local-dir:"):
        name = Path(teacher[len("local-dir:"):]).name
    elif teacher.startswith("hf-hub:"):
        name = teacher.rsplit("/", 1)[-1]
    elif teacher.startswith("remote:"):
        name = "remote-" + teacher[len("remote:"):]
    else:
        name = teacher + (f"-{Path(str(pretrained)).stem}" if pretrained else "")
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)


def teacher_specs(attrs: dict) -> tuple:
    """The ways a user may have named a teacher at extraction: its spec, and NAME@TAG."""
    return (str(attrs["teacher"]), f"{attrs['teacher']}@{attrs.get('pretrained')}")
