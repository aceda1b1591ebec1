"""Stage manifests: what a stage ran with, so unchanged work is skipped and changed work is not.

Each stage folder holds ``manifest.json``: the stage's config, the fingerprints of the inputs
it read (other stages' outputs, by path relative to the run folder) and the fingerprint, size
and mtime of each output it wrote (the fingerprint of an HDF5 store covers its attributes and
checksum tables, never its whole arrays: ``content_hash``). A stage is fresh when its config and input fingerprints are
unchanged and its outputs are still the files it wrote. Like ``make`` or DVC stages.
"""
import json
import os
import time
from pathlib import Path

from cache import atomic, store
from cache.fingerprint import file_stat, sha256_file

MANIFEST = "manifest.json"


def content_hash(path) -> str:
    """A stage output's fingerprint: an HDF5 store's attributes and checksum tables (cheap, and
    enough: its rows are verified against them where they are read), any other file's sha256."""
    return store.content_hash(path) or sha256_file(path)


def _normal(obj):
    """Round-trip through JSON so tuples and lists compare equal."""
    return json.loads(json.dumps(obj, sort_keys=True))


def load(stage_dir) -> dict | None:
    """The recorded manifest; None when there is none or it is unreadable (then the stage is stale)."""
    path = Path(stage_dir) / MANIFEST
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (FileNotFoundError, ValueError):  # missing, empty or torn: never trusted
        return None
    return recorded if isinstance(recorded, dict) and "outputs" in recorded else None


def write(stage_dir, config: dict, inputs: dict, outputs: list, summary: dict | None = None) -> dict:
    """Record a finished stage. ``outputs`` are file names inside ``stage_dir``."""
    stage_dir = Path(stage_dir)
    manifest = {
        "config": _normal(config),
        "inputs": _normal(inputs),
        "outputs": {name: {"sha256": content_hash(stage_dir / name), **file_stat(stage_dir / name)}
                    for name in outputs},
        "summary": _normal(summary or {}),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _replace(stage_dir, manifest)
    return manifest


def _replace(stage_dir, manifest: dict) -> None:
    with atomic.replacing(Path(stage_dir) / MANIFEST) as tmp, open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def invalidate(stage_dir) -> dict | None:
    """Mark a stage as being recomputed: an interrupted recompute is never fresh, but the record
    of the last finished run (its summary and output hashes) is kept, not deleted. Returns it."""
    recorded = load(stage_dir)
    if recorded is not None and not recorded.get("recomputing"):
        _replace(stage_dir, {**recorded, "recomputing": True})
    return recorded


def restore(stage_dir, recorded: dict | None) -> None:
    """Put back the record of a finished run whose outputs a refused recompute left untouched."""
    if recorded is None or recorded.get("recomputing"):
        return
    for name, output in recorded["outputs"].items():
        path = Path(stage_dir) / name
        if not path.exists() or (file_stat(path) != {"size": output["size"], "mtime_ns": output["mtime_ns"]}
                                 and content_hash(path) != output["sha256"]):
            return
    _replace(stage_dir, recorded)


def output_hash(run_root, relpath: str) -> str | None:
    """Current fingerprint of a stage output, by path relative to the run folder.

    Taken from the producing stage's manifest while the file is unchanged (same size and
    mtime); recomputed if the file was modified since; None if it is missing or unrecorded.
    """
    path = Path(run_root) / relpath
    manifest = load(path.parent)
    if manifest is None or manifest.get("recomputing") or path.name not in manifest["outputs"] \
            or not path.exists():
        return None
    recorded = manifest["outputs"][path.name]
    if file_stat(path) == {"size": recorded["size"], "mtime_ns": recorded["mtime_ns"]}:
        return recorded["sha256"]
    return content_hash(path)


def why_stale(stage_dir, config: dict, inputs: dict) -> str | None:
    """None when the stage is fresh, else a short reason."""
    stage_dir = Path(stage_dir)
    manifest = load(stage_dir)
    if manifest is None:
        return "never run"
    if manifest.get("recomputing"):
        return "a recompute did not finish"
    changed = sorted(k for k in set(manifest["config"]) | set(_normal(config))
                     if manifest["config"].get(k) != _normal(config).get(k))
    if changed:
        return "config changed: " + ", ".join(changed)
    changed = sorted(k for k in set(manifest["inputs"]) | set(inputs)
                     if manifest["inputs"].get(k) != inputs.get(k))
    if changed:
        return "input changed: " + ", ".join(changed)
    for name, recorded in manifest["outputs"].items():
        path = stage_dir / name
        if not path.exists():
            return f"output missing: {name}"
        if file_stat(path) != {"size": recorded["size"], "mtime_ns": recorded["mtime_ns"]} \
                and content_hash(path) != recorded["sha256"]:
            return f"output modified: {name}"
    return None


def stale_inputs(run_root, stage_dir) -> list:
    """Recorded run-folder inputs of a finished stage whose producers have changed since."""
    manifest = load(stage_dir)
    if manifest is None:
        return []
    return [name for name, digest in manifest["inputs"].items()
            if "/" in name and output_hash(run_root, name) != digest]
