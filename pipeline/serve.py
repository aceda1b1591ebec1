"""``pipeline serve-teacher``: any open_clip model behind the Open Inference Protocol (KServe v2).

Built on KServe's Python model server (``pip install -e ".[serve]"``): this module only adds the
model class, input checks and a few server settings. Endpoints (REST, JSON):

- ``GET  /v2/health/ready``
- ``GET  /v2/models/{name}``: the standard metadata plus what a client needs to render views
  for this teacher and to identify it.
- ``POST /v2/models/{name}/infer`` with ONE input, images (PNG) or texts. The reply's embeddings
  are L2-normalised for images, raw for texts (RISE averages raw prompt embeddings; clients normalise).

The format (metadata keys, encodings, input names) is ``stages/teacher_wire.py``, shared with the client.

Bad input (an oversized body, too many items, an undecodable image, a wrong size, datatype or
shape) gets a 4xx with a message, never a crash; a body not received within ``body_timeout``
seconds gets 408. With a token set (``--token-env``), every route but the health probes
(``/``, ``/v2/health/live``, ``/v2/health/ready``) answers 401 without it.
"""
import asyncio
import hmac
import json
import os
import random
import sys
import uuid

import numpy as np
import torch

from stages import teacher_wire as wire

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body larger than this gets 413
MAX_ITEMS = 1024                     # images or texts in one request
MAX_TEXT_CHARS = 2000
BODY_TIMEOUT_S = 60.0                # the whole request body must arrive within this, or 408
OPEN_PATHS = {"/", "/v2/health/live", "/v2/health/ready"}  # liveness and readiness: no token needed


def _kserve():
    """Import KServe without letting it parse our command line (it reads sys.argv on import)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve.model_server  # parses the emptied argv once; binds ``kserve`` too
    except ImportError:
        from cache.errors import UserError
        raise UserError('serve-teacher needs the optional server: pip install -e ".[serve]"') from None
    finally:
        sys.argv = argv
    return kserve


def describe_teacher(teacher, model_name: str) -> wire.Description:
    """Preprocessing, embedding size and the weights' fingerprint, for the model metadata."""
    dim = int(teacher.encode_texts(["a"]).shape[-1])
    source = teacher.name if not teacher.name.startswith("local-dir:") else "local-dir"
    return wire.Description(teacher.input_spec, dim, teacher.identity["checkpoint_sha256"], source,
                            teacher.pretrained or "", model_name, MAX_ITEMS,
                            logit_scale=teacher.logit_scale, logit_bias=teacher.logit_bias)


def build_model(teacher, model_name: str):
    """A KServe ``Model`` serving ``teacher`` (an ``OpenClipTeacher``) under ``model_name``."""
    kserve = _kserve()
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferResponse

    import threading
    forward = threading.Lock()
    described = describe_teacher(teacher, model_name)
    size, dim = described.spec.size, described.embed_dim

    def decode_image(i: int, item) -> torch.Tensor:
        try:
            image = wire.decode_image(item, size)
        except ValueError as e:
            raise InvalidInput(f"image {i}: {e}")
        with image:  # the teacher's own preprocessing; at its size the resize is a copy
            return teacher.input_spec(image)

    class OpenClipService(kserve.Model):
        def __init__(self):
            super().__init__(model_name)
            self.served = dict.fromkeys(wire.INPUTS, 0)

        def load(self) -> bool:
            self.ready = True
            return self.ready

        def get_input_types(self):
            return [{"name": name, "datatype": wire.BYTES, "shape": [-1]} for name in wire.INPUTS]

        def get_output_types(self):
            return [{"name": wire.OUTPUT, "datatype": wire.OUTPUT_DATATYPE, "shape": [-1, dim]}]

        async def predict(self, payload, headers=None):
            # Decoding and the forward pass run off the event loop, so health and metadata
            # calls stay answered while a batch computes; one forward pass at a time.
            return await asyncio.to_thread(self.predict_now, payload)

        def predict_now(self, payload):
            inputs = getattr(payload, "inputs", None)
            if not isinstance(inputs, list) or len(inputs) != 1:
                raise InvalidInput("send exactly one input tensor, 'image' or 'text'")
            tensor = inputs[0]
            if tensor.name not in wire.INPUTS:
                raise InvalidInput(f"unknown input '{tensor.name}'; this model takes 'image' or 'text'")
            if tensor.datatype != wire.BYTES:
                raise InvalidInput(f"input '{tensor.name}' must have datatype {wire.BYTES}, got {tensor.datatype}")
            data = tensor.data
            if not isinstance(data, list):
                raise InvalidInput(f"input '{tensor.name}': data must be a list")
            if list(tensor.shape) != [len(data)]:
                raise InvalidInput(f"input '{tensor.name}': shape {list(tensor.shape)} does not match "
                                   f"{len(data)} items (expected [{len(data)}])")
            if not 0 < len(data) <= MAX_ITEMS:
                raise InvalidInput(f"input '{tensor.name}': {len(data)} items; send 1 to {MAX_ITEMS} per request")
            if tensor.name == wire.IMAGE:
                pixels = torch.stack([decode_image(i, item) for i, item in enumerate(data)])
                with forward:
                    embeddings = teacher.encode_images(pixels)
            else:
                texts = [item.decode("utf-8", "replace") if isinstance(item, bytes) else item for item in data]
                for i, text in enumerate(texts):
                    if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
                        raise InvalidInput(f"text {i}: must be a string of at most {MAX_TEXT_CHARS} characters")
                with forward:
                    embeddings = teacher.encode_texts(texts, normalize=False)
            self.served[tensor.name] += len(data)
            out = InferOutput(name=wire.OUTPUT, shape=list(embeddings.shape), datatype=wire.OUTPUT_DATATYPE)
            out.set_data_from_numpy(embeddings.numpy().astype(np.float32), binary_data=False)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=model_name,
                                 infer_outputs=[out], parameters={wire.VERSION: described.version})

    model = OpenClipService()
    model.load()
    return model, described


class LimitsMiddleware:
    """ASGI middleware in front of every route: checks the bearer token (401), reads the whole
    request body within ``body_timeout`` seconds (408) and ``max_body`` bytes (413) before any
    route code runs, and, for tests only, injects faults (429 with Retry-After, slow replies)
    into inference calls."""

    def __init__(self, app, max_body: int, token: str | None, faults: dict | None,
                 body_timeout: float = BODY_TIMEOUT_S):
        self.app, self.max_body, self.faults, self.body_timeout = app, max_body, faults or {}, body_timeout
        self.expected = None if token is None else b"Bearer " + token.encode()
        self.rng = random.Random(self.faults.get("seed", 0))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan events; the app has no websocket routes
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        # With a token, every route needs it but an allow-list of health probes (open for
        # orchestrators): KServe's other routes (/v1, /v2 server metadata, model repository
        # load/unload, /metrics) are guarded rather than turned off, and so is any route a later
        # KServe adds.
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await _reply(send, 401, "missing or wrong bearer token", close=True)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"request body over {self.max_body} bytes; send fewer items per request",
                                close=True)
        if scope["path"].endswith("/infer") and self.faults:
            draw = self.rng.random()
            if draw < self.faults.get("429", 0.0):
                return await _reply(send, 429, "injected: too many requests",
                                    [(b"retry-after", str(self.faults.get("retry_after", 0.1)).encode())])
            if draw < self.faults.get("429", 0.0) + self.faults.get("slow", 0.0):
                await asyncio.sleep(float(self.faults.get("slow_s", 2.0)))
        body = await self._read_body(receive, send)
        if body is None:  # refused, or the client went away
            return
        replayed = False

        async def replay():  # the body once, then the server's own messages (a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _read_body(self, receive, send) -> bytes | None:
        """The whole body; a client that sends it too slowly or too much gets 408 or 413 and the
        connection closed, so a stalled upload cannot hold a connection open for ever."""
        loop = asyncio.get_running_loop()
        deadline, chunks, seen = loop.time() + self.body_timeout, [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await _reply(send, 408, f"request body not received within {self.body_timeout:g} s", close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                await _reply(send, 413, f"request body over {self.max_body} bytes", close=True)
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _reply(send, status: int, message: str, extra=(), close: bool = False):
    body = json.dumps({"error": message}).encode()
    extra = [*extra, (b"connection", b"close")] if close else extra  # the rest of an unread body is not parsed
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


def parse_faults(spec: str | None) -> dict | None:
    """``429=0.2,slow=0.1,slow_s=2,retry_after=0.1,seed=0`` -> dict (testing only)."""
    if not spec:
        return None
    return {k: float(v) for k, v in (part.split("=", 1) for part in spec.split(",") if part)}


def serve(teacher_name: str, pretrained, *, host: str = "127.0.0.1", port: int = 8080, model_name: str = "teacher",
          token_env: str = "PIPELINE_TEACHER_TOKEN", max_body: int = MAX_BODY_BYTES, faults: str | None = None,
          device: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
          body_timeout: float = BODY_TIMEOUT_S) -> None:
    """Load the teacher and serve it until SIGINT/SIGTERM."""
    _kserve()
    import logging

    from fastapi.responses import JSONResponse
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    from stages.teacher import OpenClipTeacher

    if bool(tls_cert) != bool(tls_key):
        from cache.errors import UserError
        raise UserError("--tls-cert and --tls-key go together")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = OpenClipTeacher(teacher_name, pretrained, device=device)
    model, described = build_model(teacher, model_name)
    repository = ModelRepository()
    repository.update(model)
    dataplane = DataPlane(model_registry=repository)
    rest = RESTServer("kserve.model_server:app", dataplane, ModelRepositoryExtension(model_registry=repository),
                      port, timeout_keep_alive=30, grace_period=5, ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    rest.config.host = host  # KServe binds 0.0.0.0; we bind only where asked
    from kserve.model_server import app

    async def metadata(model_name_: str):
        # The standard v2 model metadata, plus the teacher's description.
        if model_name_ != model_name:
            return JSONResponse({"error": f"Model with name {model_name_} does not exist."}, status_code=404)
        return JSONResponse(described.metadata(await dataplane.model_metadata(model_name_)))

    app.add_api_route("/v2/models/{model_name_}", metadata, methods=["GET"])  # first match wins
    token = os.environ.get(token_env) or None
    app.add_middleware(LimitsMiddleware, max_body=max_body, token=token, faults=parse_faults(faults),
                       body_timeout=body_timeout)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    print(f"serve-teacher: {teacher_name} as '{model_name}' (dim {described.embed_dim}, input {described.spec.size} "
          f"px, version {described.version[:16]}) on {'https' if tls_cert else 'http'}://{host}:{port}"
          + ("; bearer token required" if token else ""), file=sys.stderr, flush=True)
    asyncio.run(rest.start())
