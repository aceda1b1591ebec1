"""A black-box teacher: `pipeline serve-teacher` on 127.0.0.1 and `extract --teacher URL`.

Needs the optional server (``pip install -e ".[serve]"``); skipped without it. Every server a
test starts is stopped by the test.
"""
import importlib.util
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import invoke

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kserve") is None or importlib.util.find_spec("httpx") is None,
                                reason='needs the optional server: pip install -e ".[serve]"')

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-never-recorded"
COMPARED = ("image_emb", "text_emb", "classifier", "rise_text_emb", "rise_classifier", "anchor_emb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pipeline serve-teacher` in a subprocess on 127.0.0.1."""

    def __init__(self, teacher_dir, log_path, *extra, env=None, settings=None):
        self.port, self.log_path, self.env = free_port(), Path(log_path), {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.cmd = [sys.executable, "-m", "pipeline", "serve-teacher", "--teacher", f"local-dir:{teacher_dir}",
                    "--host", "127.0.0.1", "--port", str(self.port), *map(str, extra)]
        if settings:  # serve()'s keyword arguments that have no command-line option (a short body timeout)
            call = f"serve({f'local-dir:{teacher_dir}'!r}, None, host='127.0.0.1', port={self.port}, **{settings!r})"
            self.cmd = [sys.executable, "-c", "from pipeline.serve import serve; " + call]
        scheme = "https" if "--tls-cert" in extra else "http"
        self.url, self.proc, self.starts = f"{scheme}://127.0.0.1:{self.port}", None, 0
        self.verify = True

    def start(self, wait: float = 50.0):
        import httpx
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.time() + wait
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve-teacher exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("serve-teacher did not become ready")

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(teacher_dir, tmp_path_factory):
    s = Server(teacher_dir, tmp_path_factory.mktemp("server") / "serve.log").start()
    yield s
    s.stop()


def assert_same_cache(remote_run, local_run):
    with h5py.File(remote_run / "extract" / "teacher.h5") as r, h5py.File(local_run / "extract" / "teacher.h5") as l:
        np.testing.assert_array_equal(r["status"][:], l["status"][:])
        np.testing.assert_array_equal(r["view_params"][:], l["view_params"][:])
        for name in COMPARED:  # float16 storage: batch composition may move the last bit
            a, b = r[name][:].astype(np.float32), l[name][:].astype(np.float32)
            assert a.shape == b.shape, name
            np.testing.assert_allclose(a, b, atol=2e-3, rtol=0, err_msg=name)
            assert (a == b).mean() > 0.9, name


def planned(run, views: int) -> int:
    with h5py.File(run / "extract" / "teacher.h5") as f:
        ok = int((f["status"][:] == 1).sum())
        texts = sum(f[n].shape[0] * f[n].shape[1] for n in ("text_emb", "rise_text_emb", "anchor_emb"))
    return ok * views + texts, ok, texts


def queries(run) -> dict:
    return json.loads((run / "extract" / "queries.json").read_text())


def test_remote_extraction_equals_local(server, extracted, dataset, tmp_path):
    run = tmp_path / "remote"
    started = time.time()
    result = invoke("extract", "--data", dataset, "--run", run, "--teacher", server.url, "--views", 3,
                    "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    seconds = time.time() - started
    assert_same_cache(run, extracted)
    need, ok, texts = planned(run, 3)
    q = queries(run)
    assert (q["sent"], q["image"], q["text"], q["retried"], q["failed"]) == (need, ok * 3, texts, 0, 0)
    summary = json.loads((run / "extract" / "manifest.json").read_text())["summary"]
    assert summary["queries"]["sent"] == need and summary["teacher_url"] == server.url
    local = json.loads((extracted / "extract" / "manifest.json").read_text())["summary"]
    print(f"\nremote: {ok} images x 3 views + {texts} prompts = {need} queries sent; "
          f"{summary['images_per_s']} images/s remote vs {local['images_per_s']} local ({seconds:.1f} s in all)")
    info = invoke("info", "--run", run)
    assert f"teacher queries: {need:,} sent" in info.output and "0 retried, 0 failed" in info.output

    again = invoke("extract", "--data", dataset, "--run", run, "--teacher", server.url, "--views", 3,
                   "--workers", 0, "--batch-size", 16)
    assert again.exit_code == 0 and "up to date" in again.output
    assert queries(run)["sent"] == need  # nothing sent for a finished extraction

    # Everything after extraction runs as with a local teacher; sd needs the weights.
    sd = invoke("distill", "--run", run, "--method", "sd", "--holdout", "sketch", "--steps", 1, "--per-domain", 1,
                "--eval-every", 1, "--workers", 0)
    assert sd.exit_code == 2 and "white-box" in sd.output and "Traceback" not in sd.output
    zeroshot = invoke("evaluate", "--run", run, "--method", "zeroshot", "--holdout", "sketch")
    assert zeroshot.exit_code == 0, zeroshot.output


def test_max_queries_refused_before_any_query(server, dataset, tmp_path):
    run = tmp_path / "budget"
    result = invoke("extract", "--data", dataset, "--run", run, "--teacher", server.url, "--views", 3,
                    "--workers", 0, "--max-queries", 100)
    assert result.exit_code == 2
    assert "needs" in result.output and "--max-queries is 100" in result.output and "nothing was sent" in result.output
    assert not (run / "extract" / "teacher.h5").exists() and not (run / "extract" / "queries.json").exists()


def test_unreadable_images_are_skipped_without_a_query(server, dataset, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    first = sorted(p for p in data.rglob("*.png"))[0]
    first.write_bytes(b"not an image")
    run = tmp_path / "skipped"
    result = invoke("extract", "--data", data, "--run", run, "--teacher", server.url, "--views", 3,
                    "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    need, ok, texts = planned(run, 3)
    with h5py.File(run / "extract" / "teacher.h5") as f:
        assert int((f["status"][:] == 2).sum()) == 1
    q = queries(run)
    assert q["image"] == ok * 3 and q["sent"] == need  # no query for the unreadable image's views


def test_a_served_teacher_is_cached_beside_a_local_one(server, extracted, dataset, tmp_path):
    import shutil
    run = tmp_path / "other"
    shutil.copytree(extracted, run)  # a local extraction of the same architecture, another "service"
    local = (run / "extract" / "teacher.h5").read_bytes()
    result = invoke("extract", "--data", dataset, "--run", run, "--teacher", server.url, "--views", 3,
                    "--workers", 0, "--batch-size", 16)
    assert result.exit_code == 0 and "cached beside tiny" in result.output, result.output
    assert (run / "extract" / "teachers" / "remote-teacher" / "teacher.h5").exists()
    assert (run / "extract" / "teacher.h5").read_bytes() == local


def test_bad_input_gets_4xx_and_the_server_lives(server):
    import base64
    import io

    import httpx
    from PIL import Image

    def png(size, mode="RGB"):
        buffer = io.BytesIO()
        Image.new(mode, (size, size)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    infer = server.url + "/v2/models/teacher/infer"

    def post(name, data, shape=None, datatype="BYTES", **kw):
        body = {"inputs": [{"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}]}
        return httpx.post(infer, json=body, timeout=10, **kw)

    cases = {
        "not base64": post("image", ["%%%"]),
        "not a png": post("image", [base64.b64encode(b"GIF89a....").decode()]),
        "truncated png": post("image", [base64.b64encode(base64.b64decode(png(32))[:40]).decode()]),
        "wrong size": post("image", [png(64)]),
        "grayscale": post("image", [png(32, "L")]),
        "shape mismatch": post("text", ["a", "b"], shape=[3]),
        "wrong datatype": post("text", [1.0], datatype="FP32"),
        "unknown input": post("audio", ["x"]),
        "too many items": post("text", ["a"] * 1025),
        "empty": post("text", []),
        "not json": httpx.post(infer, content=b"{", headers={"content-type": "application/json"}, timeout=10),
        "two inputs": httpx.post(infer, json={"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]},
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["b"]}]}, timeout=10),
        "oversized": httpx.post(infer, content=b" " * (64 * 1024 * 1024 + 1),
                                headers={"content-type": "application/json"}, timeout=30),
    }
    for what, reply in cases.items():
        assert 400 <= reply.status_code < 500, (what, reply.status_code, reply.text[:200])
        assert reply.text, what
    assert cases["oversized"].status_code == 413
    assert "32x32" in cases["wrong size"].json()["error"]
    assert httpx.get(server.url + "/v2/models/nope", timeout=5).status_code == 404
    assert httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 200
    good = post("image", [png(32), png(32)])
    assert good.status_code == 200 and good.json()["outputs"][0]["shape"] == [2, 32]
    meta = httpx.get(server.url + "/v2/models/teacher", timeout=5).json()
    assert meta["parameters"]["size"] == 32 and meta["parameters"]["embed_dim"] == 32
    assert meta["versions"] == [meta["parameters"]["version"]]


def test_with_a_token_every_route_but_the_health_probes_needs_it(teacher_dir, tmp_path):
    """Every route KServe serves (listed by its own OpenAPI document, plus the routes it leaves out
    of it) answers 401 without the token or with a wrong one, before any route code runs."""
    import httpx
    open_paths = {"/", "/v2/health/live", "/v2/health/ready"}  # liveness and readiness probes
    server = Server(teacher_dir, tmp_path / "serve.log", env={"PIPELINE_TEACHER_TOKEN": TOKEN}).start()
    try:
        good = {"Authorization": f"Bearer {TOKEN}"}
        schema = httpx.get(server.url + "/openapi.json", headers=good, timeout=5)
        assert schema.status_code == 200
        routes = {(method.upper(), path) for path, methods in schema.json()["paths"].items() for method in methods}
        routes |= {("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no/such/route"),
                   ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"),
                   ("GET", "/v2/models/{model_name}/versions/{model_version}")}
        assert {("GET", "/v2"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/models/{model_name}:predict"),
                ("POST", "/v2/repository/models/{model_name}/unload")} <= routes
        checked = 0
        for method, path in sorted(routes):
            url = server.url + path.replace("{model_version}", "1").replace("{model_name_}", "teacher") \
                .replace("{model_name}", "teacher")
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]} \
                if method == "POST" else None
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                reply = httpx.request(method, url, json=body, headers=headers, timeout=5)
                expected = 200 if path in open_paths else 401
                assert reply.status_code == expected, (method, path, headers, reply.status_code, reply.text[:200])
            checked += 1
        print(f"\ntoken: {checked} routes checked, {len(open_paths)} open without it ({', '.join(sorted(open_paths))})")
        assert {p for _, p in routes} >= open_paths and checked >= 20
        # with the token, inference and metadata still work
        reply = httpx.post(server.url + "/v2/models/teacher/infer", headers=good, timeout=10, json=body)
        assert reply.status_code == 200 and reply.json()["outputs"][0]["shape"] == [1, 32]
        assert httpx.get(server.url + "/v2/models/teacher", headers=good, timeout=5).status_code == 200
    finally:
        server.stop()
    assert TOKEN not in (tmp_path / "serve.log").read_text()


def test_a_slow_or_stalled_body_gets_408_in_bounded_time(teacher_dir, tmp_path):
    """A client that stalls mid-body, or trickles it a byte at a time, gets 408 and the connection
    closed once the body timeout passes; an endless chunked body gets 413; the server lives."""
    import httpx
    server = Server(teacher_dir, tmp_path / "serve.log",
                    settings={"body_timeout": 1.0, "max_body": 1 << 20}).start()

    def send_slowly(head: bytes, trickle: bool) -> tuple:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(head + b'{"inputs": [')
            started, reply = time.time(), b""
            while time.time() - started < 10:
                if not select.select([s], [], [], 0.2)[0]:  # nothing to read yet: trickle a byte
                    if trickle:
                        s.sendall(b" ")
                    continue
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:  # our byte met the closed connection: closed too
                    break
                if not chunk:  # the server closed the connection
                    break
                reply += chunk
            return time.time() - started, reply

    try:
        head = (b"POST /v2/models/teacher/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n")
        for trickle in (False, True):
            seconds, reply = send_slowly(head, trickle)
            print(f"\nslow body ({'trickled' if trickle else 'stalled'}): 408 after {seconds:.2f} s")
            assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower(), reply[:300]
            assert 0.9 < seconds < 3, seconds
        endless = (b" " * 65536 for _ in range(100))  # 6.4 MB with no Content-Length: chunked
        reply = httpx.post(server.url + "/v2/models/teacher/infer", content=endless, timeout=10)
        assert reply.status_code == 413
        assert httpx.get(server.url + "/v2/health/ready", timeout=5).status_code == 200
        text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
        assert httpx.post(server.url + "/v2/models/teacher/infer", json=text, timeout=10).status_code == 200
    finally:
        server.stop()


def test_faults_kills_429s_and_slow_replies(teacher_dir, extracted, dataset, tmp_path, monkeypatch):
    """The server is killed and restarted three times during one extraction, and answers 429 or
    slowly at random: the extraction completes, equals the local one, and no finished block is
    paid twice. The token never appears in the run folder or the output."""
    server = Server(teacher_dir, tmp_path / "serve.log", "--inject-faults",
                    "429=0.15,slow=0.05,slow_s=1.5,retry_after=0.1,seed=3",
                    env={"PIPELINE_TEACHER_TOKEN": TOKEN}).start()
    import httpx
    assert httpx.get(server.url + "/v2/models/teacher", timeout=5).status_code == 401  # no token
    no_token = invoke("extract", "--data", dataset, "--run", tmp_path / "no-token", "--teacher", server.url)
    assert no_token.exit_code == 2 and "401" in no_token.output
    monkeypatch.setenv("PIPELINE_TEACHER_TOKEN", TOKEN)
    monkeypatch.setenv("PIPELINE_TEACHER_TIMEOUT", "1")
    monkeypatch.setenv("PIPELINE_TEACHER_RETRIES", "12")
    monkeypatch.setenv("PIPELINE_TEACHER_BACKOFF", "0.1")
    run = tmp_path / "faults"
    kills, done = [], threading.Event()

    def chaos():
        ledger = run / "extract" / "queries.json"
        for threshold in (40, 140, 240):
            while not done.is_set() and not (ledger.exists() and _sent(ledger) >= threshold):
                time.sleep(0.05)
            if done.is_set():
                return
            server.kill()
            kills.append(_sent(ledger))
            time.sleep(0.3)
            server.start()

    killer = threading.Thread(target=chaos)
    killer.start()
    try:
        result = invoke("extract", "--data", dataset, "--run", run, "--teacher", server.url, "--views", 3,
                        "--workers", 0, "--batch-size", 8, "--teacher-concurrency", 3)
    finally:
        done.set()
        killer.join(60)
        server.stop()
    assert result.exit_code == 0, result.output
    assert len(kills) == 3, kills
    assert_same_cache(run, extracted)
    need, ok, texts = planned(run, 3)
    q = queries(run)
    print(f"\nfaults: {len(kills)} kills at {kills} queries; sent {q['sent']} (planned {need}), "
          f"retried {q['retried']}, failed {q['failed']}, reused {q['reused']}, requests {q['requests']}")
    assert q["sent"] == need and q["failed"] == 0 and q["retried"] > 0
    for path in run.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in result.output and TOKEN not in (tmp_path / "serve.log").read_text()


def test_retries_exhausted_then_resume_pays_no_finished_block_twice(server, teacher_dir, extracted, dataset, tmp_path,
                                                                     monkeypatch):
    """With the server gone the extraction stops with one line and keeps what it received; the
    resumed run sends only what is missing."""
    monkeypatch.setenv("PIPELINE_TEACHER_RETRIES", "2")
    monkeypatch.setenv("PIPELINE_TEACHER_BACKOFF", "0.05")
    flaky = Server(teacher_dir, tmp_path / "serve.log").start()
    run = tmp_path / "resume"
    killed = threading.Event()

    def kill_midway():
        ledger = run / "extract" / "queries.json"
        while not (ledger.exists() and _sent(ledger) >= 150):
            time.sleep(0.02)
        flaky.kill()
        killed.set()

    killer = threading.Thread(target=kill_midway, daemon=True)
    killer.start()
    try:
        first = invoke("extract", "--data", dataset, "--run", run, "--teacher", flaky.url, "--views", 3,
                       "--workers", 0, "--batch-size", 8)
    finally:
        flaky.stop()
    assert killed.is_set()
    assert first.exit_code == 2 and "failed after 2 retries" in first.output and "Traceback" not in first.output
    assert first.output.strip().splitlines()[-1].startswith("Error: teacher service")
    with h5py.File(run / "extract" / "teacher.h5") as f:
        finished, rows = int((f["status"][:] != 0).sum()), len(f["status"])
    assert 0 < finished < rows
    before = queries(run)
    # Resume against another server with the same model (the same version: the address is not identity).
    second = invoke("extract", "--data", dataset, "--run", run, "--teacher", server.url, "--views", 3,
                    "--workers", 0, "--batch-size", 8)
    assert second.exit_code == 0, second.output
    assert_same_cache(run, extracted)
    need, ok, texts = planned(run, 3)
    q = queries(run)
    print(f"\nresume: first run sent {before['sent']} ({before['failed']} failed, {finished} images finished); "
          f"total sent {q['sent']} for {need} planned, reused {q['reused']}")
    # Only queries that failed are ever sent again: no finished block is paid twice.
    assert q["sent"] - q["failed"] <= need and q["sent"] >= need


def test_several_extractions_at_once(server, extracted, dataset, tmp_path):
    """Three extraction processes against one server at once: all finish, bounded, all correct."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [tmp_path / f"load{i}" for i in range(3)]
    started = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "--data", str(dataset), "--run", str(r),
                               "--teacher", server.url, "--views", "3", "--workers", "0", "--batch-size", "16",
                               "--teacher-concurrency", "2"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in runs]
    try:
        outputs = [p.communicate(timeout=55)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.time() - started
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    for r in runs:
        assert_same_cache(r, extracted)
        need = planned(r, 3)[0]
        assert queries(r)["sent"] == need and queries(r)["failed"] == 0
    print(f"\nload: 3 concurrent extractions of {planned(runs[0], 3)[0]} queries each in {seconds:.1f} s")


def _sent(ledger: Path) -> int:
    try:
        return json.loads(ledger.read_text())["sent"]
    except (ValueError, OSError, KeyError):
        return 0


def test_retry_after_and_redaction():
    import httpx
    from email.utils import formatdate
    from stages.remote_teacher import _retry_after, redact
    assert _retry_after(httpx.Response(429, headers={"Retry-After": "2.5"})) == 2.5
    assert 8 < _retry_after(httpx.Response(503, headers={"Retry-After": formatdate(time.time() + 10, usegmt=True)})) <= 10
    assert _retry_after(httpx.Response(429)) is None
    assert redact("https://user:pw@host:8443/base/?key=abc") == "https://host:8443/base"


def self_signed(folder: Path) -> tuple:
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.mark.skipif(importlib.util.find_spec("cryptography") is None, reason="needs cryptography")
def test_tls_certificates_are_verified(teacher_dir, dataset, tmp_path, monkeypatch):
    from stages.remote_teacher import RemoteTeacher
    from cache.errors import UserError
    cert, key = self_signed(tmp_path)
    server = Server(teacher_dir, tmp_path / "serve.log", "--tls-cert", cert, "--tls-key", key)
    import ssl
    server.verify = ssl.create_default_context(cafile=str(cert))
    server.start()
    try:
        monkeypatch.setenv("PIPELINE_TEACHER_RETRIES", "3")
        started = time.time()
        with pytest.raises(UserError, match="certificate does not verify"):
            RemoteTeacher(server.url)  # a self-signed certificate is refused, at once
        assert time.time() - started < 5
        monkeypatch.setenv("PIPELINE_TEACHER_CA", str(cert))
        teacher = RemoteTeacher(server.url)
        assert teacher.encode_texts(["a photo of a dog"]).shape == (1, 32)
        assert teacher.counts["sent"] == 1
    finally:
        server.stop()


def test_what_was_received_for_an_unfinished_batch_is_not_paid_again(server, tmp_path):
    """One request of a batch fails for good: the others' embeddings are kept on disk, and the
    batch asked again sends only the failed request's items."""
    import torch
    from cache.errors import UserError
    from stages.remote_teacher import RemoteTeacher
    teacher = RemoteTeacher(server.url, request_size=4, concurrency=2)
    teacher.attach(tmp_path / "queries.json", tmp_path / "received.npz")
    pixels = torch.randint(0, 256, (12, 3, 32, 32)).float()
    real = teacher._request

    def third_fails(kind, items):
        if items[0] == first_of_third:
            teacher._count_failed(len(items))
            raise UserError("teacher service: gave up")
        return real(kind, items)

    from stages.teacher_wire import encode_image
    first_of_third = encode_image(pixels[8].to(torch.uint8).permute(1, 2, 0).numpy())
    teacher._request = third_fails
    with pytest.raises(UserError):
        teacher.encode_images(pixels)
    assert (tmp_path / "received.npz").exists() and teacher.counts["sent"] == 8
    again = RemoteTeacher(server.url, request_size=4)  # a new run into the same folder
    again.attach(tmp_path / "queries.json", tmp_path / "received.npz")
    embeddings = again.encode_images(pixels)
    assert again.counts["sent"] == 4 and again.counts["reused"] == 8
    assert embeddings.shape == (12, 32) and not (tmp_path / "received.npz").exists()
    assert json.loads((tmp_path / "queries.json").read_text())["sent"] == 12
    reference = RemoteTeacher(server.url).encode_images(pixels)
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=0)
