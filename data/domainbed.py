"""DomainBed folder layout: ``ROOT/<domain>/<class>/<image>``.

Classes are one sorted list across all domains (a domain may lack a class). Each domain is
split into train/val exactly as DomainBed (and VL2V) do: its images in torchvision ImageFolder
order are shuffled by ``np.random.RandomState(seed_hash(trial_seed, domain_index))`` and the
first ``int(0.2 * n)`` are the validation ("out") split.
"""
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cache.fingerprint import sha256_json
from cache.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}  # ImageFolder's
TRAIN, VAL = "train", "val"


@dataclass
class ImageIndex:
    """Every image of a dataset: row i here is row i of every cache built from it."""

    root: Path
    domains: list
    classes: list
    paths: list          # relative, POSIX separators
    domain: np.ndarray   # int index into domains
    label: np.ndarray    # int index into classes
    split: np.ndarray    # TRAIN or VAL
    size: np.ndarray
    mtime_ns: np.ndarray
    val_fraction: float = 0.2
    split_seed: int = 0
    status: list = field(default=None)  # filled by extraction: "ok" or the reason it was skipped
    listing: str | None = None  # ``listing_fingerprint`` of the tree when it was scanned

    def __len__(self):
        return len(self.paths)

    @property
    def fingerprint(self) -> str:
        """Changes when any image is added, removed, renamed, resized or touched."""
        return sha256_json([self.paths, self.size.tolist(), self.mtime_ns.tolist(),
                            self.val_fraction, self.split_seed])

    def rows(self, domains=None, split=None) -> np.ndarray:
        """Row numbers of the images in ``domains`` (names) and ``split``, in index order."""
        keep = np.ones(len(self), bool)
        if domains is not None:
            keep &= np.isin(self.domain, [self.domains.index(d) for d in domains])
        if split is not None:
            keep &= self.split == split
        if self.status is not None:
            keep &= self._ok()
        return np.flatnonzero(keep)

    def _ok(self) -> np.ndarray:
        """Rows whose status is "ok", computed once per status list (``rows`` is called often)."""
        if getattr(self, "_ok_of", None) is not self.status:
            self._ok_of, self._ok_rows = self.status, np.asarray(self.status) == "ok"
        return self._ok_rows

    def check_holdout(self, holdout: str) -> list:
        """The source domains for ``holdout``; a clear error if it is not a domain here."""
        if holdout not in self.domains:
            raise UserError(f"held-out domain '{holdout}' is not in this dataset; "
                            f"domains are: {', '.join(self.domains)}")
        if len(self.domains) < 2:
            raise UserError("leave-one-domain-out needs at least two domains")
        return [d for d in self.domains if d != holdout]

    def sources(self, holdout: str) -> tuple[list, list, list]:
        """(source domains, their training rows per domain, their validation rows per domain)."""
        sources = self.check_holdout(holdout)
        val_rows = [self.rows([d], VAL) for d in sources]
        if not all(len(rows) for rows in val_rows):
            raise UserError("a source domain has no validation images; extract with a larger --val-fraction")
        return sources, [self.rows([d], TRAIN) for d in sources], val_rows

    def to_columns(self) -> tuple[dict, dict]:
        columns = {
            "path": self.paths,
            "domain": [self.domains[d] for d in self.domain],
            "class": [self.classes[c] for c in self.label],
            "label": self.label.astype(np.int32),
            "split": self.split.tolist(),
            "size": self.size,
            "mtime_ns": self.mtime_ns,
        }
        if self.status is not None:
            columns["status"] = list(self.status)
        metadata = {"root": str(self.root), "domains": self.domains, "classes": self.classes,
                    "val_fraction": self.val_fraction, "split_seed": self.split_seed,
                    "fingerprint": self.fingerprint, "listing": self.listing}
        return columns, metadata

    @classmethod
    def from_columns(cls, columns, metadata: dict) -> "ImageIndex":
        """Inverse of ``to_columns``; ``columns`` is a dict of lists or the ``pa.Table`` read back.
        Column-wise (Arrow compute, no Python object per cell but paths and status): fast at 10^6 rows."""
        table = columns if isinstance(columns, pa.Table) else pa.table(columns)
        domains, classes = metadata["domains"], metadata["classes"]
        path = table.column("path").cast(pa.string())
        # a path that could leave the root: absolute, or ".." as a whole part (or missing)
        unsafe = pc.or_(pc.starts_with(path, "/"), pc.match_substring_regex(path, r"(^|/)\.\.(/|$)"))
        unsafe = pc.fill_null(unsafe, True)
        if pc.any(unsafe).as_py():
            raise UserError(f"index path '{path.filter(unsafe)[0].as_py()}' points outside the dataset root; "
                            f"the index is not trusted")
        domain = pc.index_in(table.column("domain").cast(pa.string()), value_set=pa.array(domains, pa.string()))
        if domain.null_count:
            raise UserError("an index row names a domain missing from its metadata; the index is not trusted")

        def ints(name):
            return table.column(name).to_numpy().astype(np.int64)

        return cls(
            root=Path(metadata["root"]), domains=domains, classes=classes,
            paths=path.to_pylist(), domain=domain.to_numpy().astype(np.int64), label=ints("label"),
            split=table.column("split").to_numpy(zero_copy_only=False).astype(str),
            size=ints("size"), mtime_ns=ints("mtime_ns"),
            val_fraction=metadata["val_fraction"], split_seed=metadata["split_seed"],
            status=table.column("status").to_pylist() if "status" in table.column_names else None,
            listing=metadata.get("listing"),
        )


def scan(root, val_fraction: float = 0.2, split_seed: int = 0) -> ImageIndex:
    """List every image under ``root`` and assign the train/val split."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    listing = listing_fingerprint(root)  # before the files are listed: a change while scanning shows next time
    entries = []  # (domain, class, relative path, stat), each domain in ImageFolder order
    seen = {root.resolve()}  # folders already listed: a symlink back into one (a loop) is not followed

    def new_folders(parent):
        found = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
        resolved = {p: p.resolve() for p in found}  # once each: resolve is a syscall per path part
        real = {resolved[p] for p in found if not p.is_symlink()}
        for p in found:
            if resolved[p] in seen or (p.is_symlink() and resolved[p] in real):
                continue
            seen.add(resolved[p])
            yield p

    for domain_dir in list(new_folders(root)):
        for class_dir in list(new_folders(domain_dir)):
            walk = []
            for folder, subfolders, names in os.walk(class_dir, followlinks=True):  # as ImageFolder
                subfolders[:] = [d for d in subfolders if (Path(folder) / d).resolve() not in seen]
                seen.update((Path(folder) / d).resolve() for d in subfolders)
                walk.append((folder, names))
            for folder, names in sorted(walk):
                sub = Path(folder).relative_to(class_dir).parts
                if any(part.startswith(".") for part in sub):  # a hidden folder
                    continue
                prefix = "/".join((domain_dir.name, class_dir.name) + sub) + "/"
                for name in sorted(names):  # strings, not a Path per image: pathlib is most of the time
                    if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                        continue
                    try:
                        info = os.stat(os.path.join(folder, name))  # one stat: follows links, as is_file
                    except OSError:  # a broken link
                        continue
                    if stat.S_ISREG(info.st_mode):
                        entries.append((domain_dir.name, class_dir.name, prefix + name, info))
    if not entries:
        raise UserError(f"no images found in {root}: expected ROOT/<domain>/<class>/<image> "
                        f"with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}")
    domains = sorted({e[0] for e in entries})
    classes = sorted({e[1] for e in entries})
    paths = [e[2] for e in entries]
    # dicts, not list.index: labelling stays O(N) with hundreds of classes
    domain_of, class_of = {d: i for i, d in enumerate(domains)}, {c: i for i, c in enumerate(classes)}
    domain = np.array([domain_of[e[0]] for e in entries], dtype=np.int64)
    index = ImageIndex(
        root=root.resolve(), domains=domains, classes=classes, paths=paths, domain=domain,
        label=np.array([class_of[e[1]] for e in entries], dtype=np.int64),
        split=domainbed_split(domain, val_fraction, split_seed),
        size=np.array([e[3].st_size for e in entries], dtype=np.int64),
        mtime_ns=np.array([e[3].st_mtime_ns for e in entries], dtype=np.int64),
        val_fraction=val_fraction, split_seed=split_seed,
        # images in folders below the class folders: only a full scan sees what changed there
        listing=None if any(p.count("/") > 2 for p in paths) else listing,
    )
    return index


def listing_fingerprint(root) -> str | None:
    """What changes when an image is added, removed or renamed in a DomainBed tree, at one stat per
    folder instead of one per image: the (mtime, inode) of the root and of every domain and class
    folder (a folder's mtime changes when an entry in it is added, removed or renamed). An image
    rewritten in place under its name does not change it; ``--rescan`` finds that. None when the
    tree cannot be listed."""
    root, stats = Path(root), []
    try:
        folders = [root]
        for domain in sorted(p for p in root.iterdir() if p.is_dir()):
            folders += [domain, *sorted(c for c in domain.iterdir() if c.is_dir())]
        for folder in folders:
            info = folder.stat()
            stats.append((folder.relative_to(root).as_posix(), info.st_mtime_ns, info.st_ino))
    except OSError:
        return None
    return sha256_json(stats)


def seed_hash(*args) -> int:
    """DomainBed's ``misc.seed_hash``: an integer seed derived from the arguments."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2 ** 31)


def domainbed_split(domain: np.ndarray, val_fraction: float, trial_seed: int) -> np.ndarray:
    """DomainBed's ``split_dataset`` per domain: rows of each domain in ImageFolder order, the first
    ``int(n * val_fraction)`` of the shuffled keys are VAL ("out"), the rest TRAIN ("in")."""
    split = np.full(len(domain), TRAIN, dtype=object)
    for env_i in np.unique(domain):
        rows = np.flatnonzero(domain == env_i)
        keys = list(range(len(rows)))
        np.random.RandomState(seed_hash(trial_seed, int(env_i))).shuffle(keys)
        split[rows[keys[:int(len(rows) * val_fraction)]]] = VAL
    return split.astype(str)
