"""A black-box teacher: image and text embeddings from a remote service speaking the Open
Inference Protocol (KServe v2; Triton, KServe and MLServer speak it; ``pipeline serve-teacher``
serves any open_clip model on it).

Same members as ``OpenClipTeacher`` (``identity``, ``input_spec``, ``encode_images``,
``encode_texts``), so extraction runs unchanged. Views are rendered and resized here, at the
teacher's input size with its interpolation (both read from the service's metadata), and
travel PNG-encoded (lossless 8-bit RGB); the service normalises with the model's own mean/std,
so the teacher sees exactly the pixels a local extraction feeds it. The wire format, shared
with ``pipeline serve-teacher``, is ``stages/teacher_wire.py``.

Every query is counted: one image query per view, one text query per prompt. ``sent`` counts
first attempts, ``retried`` re-sends after a timeout, a dropped connection, 429 or 5xx, and
``failed`` the queries given up on. The counts accumulate across resumed runs in
``extract/queries.json``. Queries received for a block that could not be finished are kept in
``extract/received.npz`` and not paid for again when the block is redone.

The bearer token comes from an environment variable (``PIPELINE_TEACHER_TOKEN``) and is never
recorded or printed; TLS certificates are verified (a private CA bundle: ``PIPELINE_TEACHER_CA``).
"""
import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from PIL import Image

from data.views import InputSpec
from cache import atomic
from cache.errors import UserError
from stages import teacher_wire as wire

TOKEN_ENV = "PIPELINE_TEACHER_TOKEN"
CA_ENV = "PIPELINE_TEACHER_CA"
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def is_remote(teacher: str) -> bool:
    return isinstance(teacher, str) and teacher.lower().startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL without user:password@ and query string: safe to record and print, even when the
    URL is not valid (its port is not parsed)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return "(an unparseable URL)"
    host_port = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host_port, parts.path.rstrip("/"), "", ""))


def check_url(url: str):
    """The parts of a teacher service URL, or one line saying what is wrong (never echoing credentials)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # its message may quote the address, credentials included
        raise UserError("--teacher: not a valid URL") from None
    shown = f"--teacher {redact(url)}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{shown}: not an http(s) URL")
    if parts.username is not None or parts.password is not None:  # they would replace the bearer token
        raise UserError(f"{shown}: the URL holds credentials (before its @); they are not sent: put the "
                        f"service's token in the {TOKEN_ENV} environment variable instead")
    try:
        if parts.port == 0:  # urllib accepts 0; a ValueError for anything out of range or not a number
            raise ValueError
    except ValueError:
        raise UserError(f"{shown}: the port must be a number from 1 to 65535") from None
    return parts


@dataclass(frozen=True)
class RemoteInputSpec(InputSpec):
    """The teacher's resize only: pixels 0..255 (float32, exact integers), not normalised."""

    def __call__(self, view: Image.Image) -> torch.Tensor:
        pixels = self.resize(view).astype(np.float32)
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


class QueryBudgetExceeded(UserError):
    pass


class RemoteTeacher:
    """``URL`` is ``http(s)://host:port`` (model name from ``model``, default: the only/first
    model named by ``PIPELINE_TEACHER_MODEL`` or 'teacher') or ``http(s)://host:port/v2/models/NAME``."""

    skip_failed_rows = True  # extraction sends no query for views of unreadable images

    def __init__(self, url: str, *, model: str | None = None, request_size: int = 32, concurrency: int = 4,
                 timeout: float | None = None, retries: int | None = None, backoff: float | None = None,
                 max_backoff: float = 20.0, max_queries: int | None = None):
        try:
            import httpx
        except ImportError:
            raise UserError('a remote teacher needs httpx: pip install -e ".[remote]"') from None
        parts = check_url(url)
        path = parts.path.rstrip("/")
        if "/v2/models/" in path:
            path, model = path.split("/v2/models/", 1)[0], model or path.split("/v2/models/", 1)[1].split("/")[0]
        self.base = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.url = redact(self.base)
        self.model_name = model or os.environ.get("PIPELINE_TEACHER_MODEL", "teacher")
        env = os.environ.get
        self.request_size, self.concurrency = max(1, request_size), max(1, concurrency)
        self.timeout = float(timeout if timeout is not None else env("PIPELINE_TEACHER_TIMEOUT", 60))
        self.retries = int(retries if retries is not None else env("PIPELINE_TEACHER_RETRIES", 8))
        self.backoff = float(backoff if backoff is not None else env("PIPELINE_TEACHER_BACKOFF", 0.5))
        self.max_backoff, self.max_queries = max_backoff, max_queries
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(TOKEN_ENV)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._token = token
        verify = True  # certificates are always verified; a private CA can be added, never switched off
        if os.environ.get(CA_ENV):
            import ssl
            verify = ssl.create_default_context(cafile=os.environ[CA_ENV])
        self._client = httpx.Client(base_url=self.base, headers=headers, verify=verify, timeout=self.timeout,
                                    limits=httpx.Limits(max_connections=self.concurrency + 2), trust_env=False)
        self._httpx = httpx
        self._lock = threading.Lock()
        self.counts = {"sent": 0, "retried": 0, "failed": 0, "image": 0, "text": 0, "requests": 0,
                       "reused": 0}
        self.ledger: Path | None = None    # the query ledger (queries.json) and ...
        self.received: Path | None = None  # ... partly received blocks (received.npz): ``attach``
        self._prior: dict = {}
        self._received: dict = {}
        served = self._metadata()
        self.dim, self.version, spec = served.embed_dim, served.version, served.spec
        self.logit_scale, self.logit_bias = served.logit_scale, served.logit_bias
        self.input_spec = RemoteInputSpec(spec.size, spec.mean, spec.std, spec.interpolation)
        self.request_size = min(self.request_size, served.max_items or self.request_size)
        self.name, self.pretrained = f"remote:{self.model_name}", None
        self.source = {"model": self.model_name, "version": self.version, "embed_dim": self.dim,
                       "platform": served.platform, "source": served.source,
                       "source_pretrained": served.pretrained or None}

    # ---- the teacher interface -------------------------------------------------------------

    has_weights = True

    @property
    def identity(self) -> dict:
        """Name, version (the weights' fingerprint) and embedding size of the service's model; not
        its address, so the same model moved to another machine reuses the cache."""
        return {"teacher": self.name, "pretrained": None, "checkpoint_sha256": self.version,
                "preprocess": self.input_spec.to_dict(), "remote": self.source}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] pixels 0..255 (``RemoteInputSpec``) -> [n, dim] normalised embeddings."""
        arrays = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return self._encode(wire.IMAGE, [wire.encode_image(a) for a in arrays])

    def encode_texts(self, texts: list, normalize: bool = True) -> torch.Tensor:
        """[n, dim] text embeddings; the service sends them raw, as the model gives them."""
        raw = self._encode(wire.TEXT, list(texts))
        return torch.nn.functional.normalize(raw, dim=-1) if normalize else raw

    # ---- queries -----------------------------------------------------------------------------

    def planned_queries(self, store_path, n_rows: int, n_views: int, batch_size: int, n_prompts: int) -> dict:
        """The image and text queries an extraction into ``store_path`` will send at most: every
        view of every row in a block that is not finished, and every prompt if the store is new."""
        from cache import store
        store_path = Path(store_path)
        status = store.read(store_path, "status") if store_path.exists() else None
        if status is not None and len(status) == n_rows:
            block = int(store.read_attrs(store_path).get("batch_size", batch_size))
            pending = sum(len(b) for b in store.pending_blocks(status, block))
            texts = 0
        else:
            pending, texts = n_rows, n_prompts
        return {"image": pending * n_views, "text": texts, "total": pending * n_views + texts}

    def check_budget(self, plan: dict) -> None:
        if self.max_queries is not None and plan["total"] > self.max_queries:
            raise QueryBudgetExceeded(
                f"this extraction needs {plan['total']:,} teacher queries ({plan['image']:,} image views + "
                f"{plan['text']:,} prompts) but --max-queries is {self.max_queries:,}; nothing was sent")

    def attach(self, ledger: Path, received: Path) -> None:
        """Keep the query ledger and partly received blocks in these files (of the extract stage)."""
        self.ledger, self.received = Path(ledger), Path(received)
        self._prior = json.loads(self.ledger.read_text()) if self.ledger.exists() else {}
        if self.received.exists():
            with np.load(self.received) as f:
                self._received = dict(zip(f["keys"].tolist(), f["embeddings"]))

    def totals(self) -> dict:
        """Queries over every run into this folder (this run's counts added)."""
        return {k: self._prior.get(k, 0) + self.counts[k] for k in self.counts}

    def summary(self) -> dict:
        return {"teacher_url": self.url, "queries_this_run": dict(self.counts), "queries": self.totals()}

    def save_ledger(self) -> None:
        """Write the running totals to ``queries.json`` (after every batch, so a killed run counts too)."""
        if self.ledger is None:
            return
        with self._lock:
            total = self.totals()
        with atomic.replacing(self.ledger) as tmp:
            tmp.write_text(json.dumps(total, indent=2))

    def _encode(self, kind: str, items: list) -> torch.Tensor:
        keys = [hashlib.sha256((kind + "\0" + item).encode()).hexdigest()[:32] for item in items]
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        missing = [i for k, i in first.items() if k not in self._received]  # each distinct item once
        with self._lock:
            self.counts["reused"] += len(items) - len(missing)
        chunks = [missing[i:i + self.request_size] for i in range(0, len(missing), self.request_size)]
        try:
            with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(chunks)))) as pool:
                futures = [pool.submit(self._request, kind, [items[i] for i in chunk]) for chunk in chunks]
                errors = []
                for chunk, future in zip(chunks, futures):
                    try:
                        embeddings = future.result()
                    except Exception as e:  # keep what the other requests received
                        errors.append(e)
                        continue
                    for i, e in zip(chunk, embeddings):
                        self._received[keys[i]] = e
                if errors:
                    raise errors[0]
        except BaseException:
            self._save_received()
            self.save_ledger()
            raise
        out = torch.from_numpy(np.stack([self._received[k] for k in keys]))
        for k in first:
            del self._received[k]
        self._drop_received_file()
        self.save_ledger()
        return out

    def _save_received(self) -> None:
        if self.received is None or not self._received:
            return
        keys = list(self._received)
        with atomic.replacing(self.received, ".tmp.npz") as tmp:  # savez keeps a name that ends in .npz
            np.savez(tmp, keys=np.array(keys), embeddings=np.stack([self._received[k] for k in keys]))

    def _drop_received_file(self) -> None:
        if self.received is not None and not self._received:
            self.received.unlink(missing_ok=True)

    def _request(self, kind: str, items: list) -> np.ndarray:
        n = len(items)
        with self._lock:
            if self.max_queries is not None and self.counts["sent"] + n > self.max_queries:
                raise QueryBudgetExceeded(f"--max-queries {self.max_queries:,} reached; stopped before "
                                          f"sending more (everything received so far is kept)")
            self.counts["sent"] += n
            self.counts[kind] += n
        body = json.dumps(wire.infer_request(kind, items))
        path = f"/v2/models/{self.model_name}/infer"
        for attempt in range(self.retries + 1):
            wait, problem = None, None
            try:
                with self._lock:
                    self.counts["requests"] += 1
                reply = self._client.post(path, content=body)
            except self._httpx.TimeoutException:
                problem = f"no reply within {self.timeout:g} s"
            except self._httpx.TransportError as e:
                if _certificate_error(e):
                    self._count_failed(n)
                    raise self._untrusted()
                problem = f"connection failed ({type(e).__name__})"
            else:
                if reply.status_code == 200:
                    return self._embeddings(reply, n)
                problem = f"HTTP {reply.status_code}: {_message(reply)}"
                if reply.status_code not in RETRY_STATUS:
                    self._count_failed(n)
                    hint = {401: "; set the token in $" + TOKEN_ENV, 403: "; check the token in $" + TOKEN_ENV,
                            413: "; use a smaller --batch-size"}.get(reply.status_code, "")
                    raise UserError(f"teacher service {self.url} refused a {kind} request: {problem}{hint}")
                wait = _retry_after(reply)
            if attempt == self.retries:
                self._count_failed(n)
                raise UserError(f"teacher service {self.url}: {kind} request failed after {self.retries} retries "
                                f"({problem}); finished blocks are kept: run the same command again to resume")
            time.sleep(max(self._backoff(attempt), wait or 0.0))
            with self._lock:
                self.counts["retried"] += n

    def _backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt + 1``: exponential, capped, with jitter."""
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)

    def _untrusted(self) -> UserError:
        return UserError(f"teacher service {self.url}: its TLS certificate does not verify "
                         f"(a private CA: set ${CA_ENV} to its bundle)")

    def _count_failed(self, n: int) -> None:
        with self._lock:
            self.counts["failed"] += n

    def _embeddings(self, reply, n: int) -> np.ndarray:
        try:
            out = reply.json()["outputs"][0]
            emb = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"teacher service {self.url}: a reply that is not a v2 inference response")
        if emb.shape != (n, self.dim) or not np.isfinite(emb).all():
            raise UserError(f"teacher service {self.url}: expected {n} x {self.dim} finite embeddings, "
                            f"got shape {list(emb.shape)}")
        version = wire.reply_version(reply.json())
        if version is not None and version != self.version:
            raise UserError(f"teacher service {self.url}: the model changed during extraction "
                            f"(version {self.version[:16]} -> {str(version)[:16]}); nothing more is cached")
        return emb

    def _metadata(self) -> wire.Description:
        """Readiness and metadata: free (no embedding is computed), retried like any request."""
        path = f"/v2/models/{self.model_name}"
        problem = ""
        for attempt in range(self.retries + 1):
            try:
                reply = self._client.get(path)
                if reply.status_code == 200:
                    try:
                        return wire.Description.from_metadata(reply.json())
                    except ValueError:
                        raise UserError(f"teacher service {self.url}: model '{self.model_name}' does not describe "
                                        f"its preprocessing (serve it with `pipeline serve-teacher`)") from None
                problem = f"HTTP {reply.status_code}: {_message(reply)}"
                if reply.status_code not in RETRY_STATUS:
                    raise UserError(f"teacher service {self.url}: model '{self.model_name}': {problem}")
            except self._httpx.TransportError as e:
                if _certificate_error(e):
                    raise self._untrusted()
                problem = f"connection failed ({type(e).__name__})"
            if attempt < self.retries:
                time.sleep(self._backoff(attempt))
        raise UserError(f"teacher service {self.url} is not reachable ({problem})")

    def close(self) -> None:
        self._client.close()


def _certificate_error(error: BaseException) -> bool:
    import ssl
    seen = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _message(reply) -> str:
    try:
        text = str(reply.json().get("error") or reply.json().get("detail") or "")
    except ValueError:
        text = reply.text
    return " ".join(text.split())[:200] or reply.reason_phrase


def _retry_after(reply) -> float | None:
    value = reply.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, min(float(value), 300.0))
    except ValueError:
        try:
            return max(0.0, min(parsedate_to_datetime(value).timestamp() - time.time(), 300.0))
        except (TypeError, ValueError):
            return None


def count_prompts(index, templates: tuple) -> int:
    """Text queries of a new store: class prompts, RISE's 7 templates and every anchor prompt."""
    from stages.prompts import GENERIC_ANCHORS, TEMPLATE_SETS, anchor_prompts
    anchors = index.domains + list(GENERIC_ANCHORS)
    return (len(index.classes) * (len(templates) + len(TEMPLATE_SETS["rise7"]))
            + sum(len(anchor_prompts(a, index.classes)) for a in anchors))
