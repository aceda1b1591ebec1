"""``pipeline serve-teacher``: any open_clip model behind the Open Inference Protocol (KServe v2).

Built on KServe's Python model server (``pip install -e ".[serve]"``): this module only adds the
model class, input checks and a few server settings. Endpoints (REST, JSON):

- ``GET  /v2/health/ready``
- ``GET  /v2/models/{name}``: the standard metadata (name, versions, platform, inputs, outputs)
  plus ``parameters``: what a client needs to render views for this teacher and to identify it
  (input size, interpolation, mean, std, embedding size, weights fingerprint, open_clip name).
- ``POST /v2/models/{name}/infer`` with ONE input:
  ``{"name": "image", "datatype": "BYTES", "shape": [n], "data": [base64 PNG, ...]}`` (views
  already resized to the teacher's input size, 8-bit RGB; the server normalises them with the
  model's mean/std) or ``{"name": "text", "datatype": "BYTES", "shape": [n], "data": [str, ...]}``.
  The reply has one output ``embedding`` FP32 ``[n, dim]``: L2-normalised for images, the raw
  embedding for texts (RISE averages raw prompt embeddings; clients normalise).

Bad input (an oversized body, too many items, an undecodable image, a wrong size, datatype or
shape) gets a 4xx with a message, never a crash.
"""
import base64
import binascii
import io
import json
import os
import random
import sys
import uuid

import numpy as np
import torch

MAX_BODY_BYTES = 64 * 1024 * 1024  # a request body larger than this gets 413
MAX_ITEMS = 1024                     # images or texts in one request
MAX_TEXT_CHARS = 2000


def _kserve():
    """Import KServe without letting it parse our command line (it reads sys.argv on import)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        from kserve import model_server  # noqa: F401  (parses the emptied argv once)
    except ImportError:
        from cache.errors import UserError
        raise UserError('serve-teacher needs the optional server: pip install -e ".[serve]"') from None
    finally:
        sys.argv = argv
    return kserve


def describe_teacher(teacher, model_name: str) -> dict:
    """The metadata ``parameters``: preprocessing, embedding size and the weights' fingerprint."""
    spec = teacher.input_spec
    dim = int(teacher.encode_texts(["a"]).shape[-1])
    return {"size": spec.size, "interpolation": spec.interpolation, "mean": json.dumps(list(spec.mean)),
            "std": json.dumps(list(spec.std)), "embed_dim": dim, "version": teacher._checkpoint_hash(),
            "source": teacher.name if not teacher.name.startswith("local-dir:") else "local-dir",
            "pretrained": teacher.pretrained or "", "model": model_name, "max_items": MAX_ITEMS}


def build_model(teacher, model_name: str):
    """A KServe ``Model`` serving ``teacher`` (an ``OpenClipTeacher``) under ``model_name``."""
    kserve = _kserve()
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferResponse
    from PIL import Image

    import threading
    forward = threading.Lock()
    params = describe_teacher(teacher, model_name)
    size, dim = params["size"], params["embed_dim"]

    def decode_image(i: int, item) -> torch.Tensor:
        try:
            raw = base64.b64decode(item, validate=True) if isinstance(item, str) else bytes(item)
        except (binascii.Error, ValueError, TypeError):
            raise InvalidInput(f"image {i}: not base64-encoded PNG bytes")
        if raw[:8] != b"\x89PNG\r\n\x1a\n":
            raise InvalidInput(f"image {i}: not a PNG (images travel losslessly, PNG-encoded)")
        try:
            image = Image.open(io.BytesIO(raw))
            if image.size != (size, size):  # checked before decoding the pixels
                raise InvalidInput(f"image {i}: {image.size[0]}x{image.size[1]} pixels; this teacher "
                                   f"takes {size}x{size} (render the view at the teacher's input size)")
            if image.mode != "RGB":
                raise InvalidInput(f"image {i}: mode {image.mode}; send 8-bit RGB")
            image.load()
        except InvalidInput:
            raise
        except Exception as e:  # PIL raises many types on corrupt data
            raise InvalidInput(f"image {i}: cannot decode PNG: {str(e)[:200]}")
        with image:  # the teacher's own preprocessing; at its size the resize is a copy
            return teacher.input_spec(image)

    class OpenClipService(kserve.Model):
        def __init__(self):
            super().__init__(model_name)
            self.served = {"image": 0, "text": 0}

        def load(self) -> bool:
            self.ready = True
            return self.ready

        def get_input_types(self):
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                    {"name": "text", "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self):
            return [{"name": "embedding", "datatype": "FP32", "shape": [-1, dim]}]

        async def predict(self, payload, headers=None):
            # Decoding and the forward pass run off the event loop, so health and metadata
            # calls stay answered while a batch computes; one forward pass at a time.
            import asyncio
            return await asyncio.to_thread(self.predict_now, payload)

        def predict_now(self, payload):
            inputs = getattr(payload, "inputs", None)
            if not isinstance(inputs, list) or len(inputs) != 1:
                raise InvalidInput("send exactly one input tensor, 'image' or 'text'")
            tensor = inputs[0]
            if tensor.name not in ("image", "text"):
                raise InvalidInput(f"unknown input '{tensor.name}'; this model takes 'image' or 'text'")
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"input '{tensor.name}' must have datatype BYTES, got {tensor.datatype}")
            data = tensor.data
            if not isinstance(data, list):
                raise InvalidInput(f"input '{tensor.name}': data must be a list")
            if list(tensor.shape) != [len(data)]:
                raise InvalidInput(f"input '{tensor.name}': shape {list(tensor.shape)} does not match "
                                   f"{len(data)} items (expected [{len(data)}])")
            if not 0 < len(data) <= MAX_ITEMS:
                raise InvalidInput(f"input '{tensor.name}': {len(data)} items; send 1 to {MAX_ITEMS} per request")
            if tensor.name == "image":
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
            out = InferOutput(name="embedding", shape=list(embeddings.shape), datatype="FP32")
            out.set_data_from_numpy(embeddings.numpy().astype(np.float32), binary_data=False)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=model_name,
                                 infer_outputs=[out], parameters={"version": params["version"]})

    model = OpenClipService()
    model.load()
    return model, params


class LimitsMiddleware:
    """ASGI middleware: refuses oversized bodies (413), checks the bearer token (401) and, for
    tests only, injects faults (429 with Retry-After, slow replies) into inference calls."""

    def __init__(self, app, max_body: int, token: str | None, faults: dict | None):
        self.app, self.max_body, self.token, self.faults = app, max_body, token, faults or {}
        self.rng = random.Random(self.faults.get("seed", 0))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token is not None and scope["path"].startswith("/v2/models"):
            if headers.get(b"authorization", b"") != b"Bearer " + self.token.encode():
                return await _reply(send, 401, "missing or wrong bearer token")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"request body over {self.max_body} bytes; send fewer items per request")
        if scope["path"].endswith("/infer") and self.faults:
            draw = self.rng.random()
            if draw < self.faults.get("429", 0.0):
                return await _reply(send, 429, "injected: too many requests",
                                    [(b"retry-after", str(self.faults.get("retry_after", 0.1)).encode())])
            if draw < self.faults.get("429", 0.0) + self.faults.get("slow", 0.0):
                import asyncio
                await asyncio.sleep(float(self.faults.get("slow_s", 2.0)))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise _TooLarge()
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await _reply(send, 413, f"request body over {self.max_body} bytes")


class _TooLarge(Exception):
    pass


async def _reply(send, status: int, message: str, extra=()):
    body = json.dumps({"error": message}).encode()
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
          device: str | None = None, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Load the teacher and serve it until SIGINT/SIGTERM."""
    _kserve()
    import asyncio
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
    model, params = build_model(teacher, model_name)
    repository = ModelRepository()
    repository.update(model)
    dataplane = DataPlane(model_registry=repository)
    rest = RESTServer("kserve.model_server:app", dataplane, ModelRepositoryExtension(model_registry=repository),
                      port, timeout_keep_alive=30, grace_period=5, ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    rest.config.host = host  # KServe binds 0.0.0.0; we bind only where asked
    from kserve.model_server import app

    async def metadata(model_name_: str):
        # The standard v2 model metadata, plus ``parameters`` (preprocessing, dim, version).
        if model_name_ != model_name:
            return JSONResponse({"error": f"Model with name {model_name_} does not exist."}, status_code=404)
        standard = await dataplane.model_metadata(model_name_)
        return JSONResponse({**standard, "versions": [params["version"]], "platform": "open_clip",
                             "parameters": params})

    app.add_api_route("/v2/models/{model_name_}", metadata, methods=["GET"])  # first match wins
    token = os.environ.get(token_env) or None
    app.add_middleware(LimitsMiddleware, max_body=max_body, token=token, faults=parse_faults(faults))
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    print(f"serve-teacher: {teacher_name} as '{model_name}' (dim {params['embed_dim']}, input {params['size']} px, "
          f"version {params['version'][:16]}) on {'https' if tls_cert else 'http'}://{host}:{port}"
          + ("; bearer token required" if token else ""), file=sys.stderr, flush=True)
    asyncio.run(rest.start())
