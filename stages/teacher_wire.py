"""The served teacher's wire format: what ``pipeline serve-teacher`` (the server) and
``stages.remote_teacher`` (the client) agree on, on top of the Open Inference Protocol (KServe v2, REST/JSON).

Model metadata (``GET /v2/models/{name}``): the standard fields, ``platform`` "open_clip",
``versions`` [the weights' fingerprint] and ``parameters``:

- ``size`` (int, the square input in pixels), ``interpolation`` (str, the resize filter),
  ``mean`` and ``std`` (each a JSON-encoded list of 3 floats): the teacher's ``InputSpec``;
- ``embed_dim`` (int), ``version`` (str, the weights' fingerprint), ``source`` (the open_clip
  name, "local-dir" for a local folder), ``pretrained`` (str, "" for none), ``model`` (the
  served name), ``max_items`` (int, the most images or texts in one request), ``logit_scale``
  and ``logit_bias`` (floats: the teacher's logits are ``logit_scale * cos + logit_bias``;
  a server that sends none is taken as 100 and 0, OpenAI CLIP's).

Inference (``POST /v2/models/{name}/infer``): ONE input, ``image`` or ``text``, datatype
``BYTES``, shape ``[n]``. An image is a base64 PNG of the view at the teacher's input size,
8-bit RGB (the server normalises it); a text is a string. The reply has one output
``embedding`` FP32 ``[n, dim]`` and ``parameters.version``.
"""
import base64
import binascii
import io
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cache.teacher_cache import LOGIT_SCALE
from data.views import InputSpec

IMAGE, TEXT = "image", "text"
INPUTS = (IMAGE, TEXT)
BYTES = "BYTES"
OUTPUT, OUTPUT_DATATYPE = "embedding", "FP32"
PLATFORM = "open_clip"
VERSION = "version"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Description:
    """What a client needs to render views for a served teacher and to identify it."""

    spec: InputSpec
    embed_dim: int
    version: str
    source: str = ""
    pretrained: str = ""
    model: str = ""
    max_items: int | None = None
    platform: str = PLATFORM
    logit_scale: float = LOGIT_SCALE
    logit_bias: float = 0.0

    def metadata(self, standard: dict) -> dict:
        """The standard v2 model metadata with this description added."""
        spec = self.spec
        parameters = {"size": spec.size, "interpolation": spec.interpolation, "mean": json.dumps(list(spec.mean)),
                      "std": json.dumps(list(spec.std)), "embed_dim": self.embed_dim, VERSION: self.version,
                      "source": self.source, "pretrained": self.pretrained, "model": self.model,
                      "max_items": self.max_items, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias}
        return {**standard, "versions": [self.version], "platform": self.platform, "parameters": parameters}

    @classmethod
    def from_metadata(cls, meta: dict) -> "Description":
        """Inverse of ``metadata``; ValueError when the metadata does not describe a teacher."""
        try:
            p = meta["parameters"]
            spec = InputSpec(size=int(p["size"]), mean=_floats(p["mean"]), std=_floats(p["std"]),
                             interpolation=str(p.get("interpolation", "bicubic")))
            max_items = p.get("max_items")
            return cls(spec, int(p["embed_dim"]), str(p[VERSION]), p.get("source", ""), p.get("pretrained") or "",
                       p.get("model", ""), None if max_items is None else int(max_items), meta.get("platform", ""),
                       float(p.get("logit_scale", LOGIT_SCALE)), float(p.get("logit_bias", 0.0)))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError("the model metadata does not describe a served teacher") from None


def _floats(value) -> tuple:
    return tuple(float(v) for v in (json.loads(value) if isinstance(value, str) else value))


def infer_request(kind: str, items: list) -> dict:
    """The v2 inference request for ``items`` of one ``kind`` (``IMAGE``: ``encode_image`` strings)."""
    return {"inputs": [{"name": kind, "datatype": BYTES, "shape": [len(items)], "data": items}]}


def reply_version(reply: dict):
    """The weights' fingerprint an inference reply was computed with (None if not given)."""
    return (reply.get("parameters") or {}).get(VERSION)


def encode_image(pixels: np.ndarray) -> str:
    """[size, size, 3] uint8 RGB -> base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(item, size: int) -> Image.Image:
    """Inverse of ``encode_image``, checked: a loaded RGB image of ``size`` x ``size``; ValueError
    (a message for the sender) for anything else."""
    try:
        raw = base64.b64decode(item, validate=True) if isinstance(item, str) else bytes(item)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("not base64-encoded PNG bytes") from None
    if raw[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG (images travel losslessly, PNG-encoded)")
    try:
        image = Image.open(io.BytesIO(raw))
    except Exception as e:  # PIL raises many types on corrupt data
        raise ValueError(f"cannot decode PNG: {str(e)[:200]}") from None
    problem = None
    if image.size != (size, size):  # checked before decoding the pixels
        problem = (f"{image.size[0]}x{image.size[1]} pixels; this teacher takes {size}x{size} "
                   f"(render the view at the teacher's input size)")
    elif image.mode != "RGB":
        problem = f"mode {image.mode}; send 8-bit RGB"
    else:
        try:
            image.load()
        except Exception as e:
            problem = f"cannot decode PNG: {str(e)[:200]}"
    if problem:
        image.close()
        raise ValueError(problem)
    return image
