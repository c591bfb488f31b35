"""The HTTP API: search, embed and zero-shot classify over an index and its model, caption, answer questions and
draw images from text when the server is given those models, plus a search page at ``/``.

A thin layer: each endpoint validates its input, then calls ``vislang.index.Searcher``, the zero-shot functions or
the caption / VQA / text-to-image models (``generative.py``) in a worker thread. What stands between the network and
the library is here too: an optional API key, a cap on request bodies (checked before anything is read), image checks
(real image bytes, a pixel limit against decompression bombs), the Host and Origin checks, and one JSON error shape,
``{"error": message, "status": code}``, for every failure.

The event loop only routes: every decode, model call and index read runs in a worker thread, so one large upload
or a slow index never stalls ``/healthz`` or the other requests. Work that can pile up is bounded and answered 503
with ``Retry-After`` when full: the search queue (``SearchBatcher``) and the generative endpoints (``Limiter``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..evaluation.zero_shot import logit_scale_of, zero_shot_classifier
from ..index.build import read_item_image, recorded_roots
from ..index.files import served_bytes, strip_metadata
from ..index.search import Searcher
from ..index.video import frame_fields, video_step
from ..video.reader import frame_at
from .batching import Overloaded, SearchBatcher
from .generative import Captioner, ImageGenerator, QuestionAnswerer
from .guard import (
    BODY_TIMEOUT,
    RETRY_AFTER,
    SEARCH_TIMEOUT,
    ApiError,
    Guard,
    Limiter,
    answered,
    error,
    sign_url,
)
from .reading import ReadingModel, add_reading_routes
from .video import FRAME_SIDE, add_video_routes, moments_field, video_hit_fields

DOCS_ASSETS = "/docs-assets"  # Swagger UI's own files, served locally so /docs works offline
MAX_TEXTS = 256  # texts per /v1/embed request
MAX_TEXT_CHARS = 2000
MAX_LABELS = 100
MAX_CAPTION_TOKENS = 64
MAX_BEAM = 5
MAX_ANSWERS = 20  # top_k of /v1/vqa
MAX_ID = 2**63 - 1  # ids are SQLite / FAISS int64
PAGE_CSP = (  # the search page: its own files only; no other site may frame it (clickjacking)
    "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
MAX_GENERATE = 64  # images per /v1/generate request: one grid a person looks at; more is `vislang generate`'s job
GENERATE_FORMATS = ("png", "json")  # one grid PNG, or each image as base64 PNG in JSON
TASKS = {  # the optional endpoints: what they do, and the `vislang serve` option that turns each on
    "caption": ("captioning", "--caption-model DIR (a model trained with `vislang train --config caption`)"),
    "vqa": ("visual question answering", "--vqa-model DIR (a model from `vislang ablate-fusion` or train_vqa)"),
    "generate": ("text-to-image generation", "--generate-model DIR (a GAN run or model: vislang train --config gan)"),
    "read": ("reading text in images", "--read-model DIR (a reader: vislang train --config read-zh)"),
}
IMAGE_MAGIC = (  # (prefix, media type) of the formats we serve and accept
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


def sniff_image_type(data: bytes) -> str | None:
    """The media type of image bytes by their magic number (WebP too), else None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mt for magic, mt in IMAGE_MAGIC if data.startswith(magic)), None)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decode uploaded bytes: 415 when they are not an image, 400 when it is too large or broken."""
    if not data:
        raise ApiError(400, "the uploaded image is empty")
    if sniff_image_type(data) is None:
        raise ApiError(415, "the upload is not an image; send a PNG, JPEG, WebP, GIF, BMP or TIFF file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > max_pixels:  # checked before any pixel is decoded
                raise ApiError(400, f"image is {w}x{h} pixels, over the limit of {max_pixels}; send a smaller image")
            img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(400, f"image rejected as a decompression bomb ({e})") from e
    except Exception as e:  # any decoder failure is the client's file, never a server error
        raise ApiError(415, f"the upload could not be decoded as an image ({e.__class__.__name__})") from e
    return img


def check_id(image_id: Any) -> int:
    """An ``image_id`` from a JSON body: an integer (not a numeric string, not a bool) that an index can hold."""
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise ApiError(400, f"'image_id' must be an integer, got {str(image_id)[:50]!r}")
    if not 0 <= image_id <= MAX_ID:
        raise ApiError(404, f"no image with id {str(image_id)[:30]} in the index; ids are the integers search returns")
    return image_id


def local_swagger_ui() -> str | None:
    """The folder of Swagger UI's files from the ``swagger-ui-bundle`` package, or None when it is not installed.

    Why: FastAPI's /docs page loads Swagger UI from a CDN by default, which an offline machine cannot reach; the
    package ships the same files, so the page renders with no network.
    """
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return str(swagger_ui_bundle.swagger_ui_path)


class Service:
    """The state behind the endpoints: the searcher, limits, a cache of zero-shot classifiers."""

    def __init__(
        self,
        searcher: Searcher,
        max_k: int,
        max_pixels: int,
        models: dict[str, Any] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.searcher, self.max_k, self.max_pixels = searcher, max_k, max_pixels
        self.sign = functools.partial(sign_url, api_key) if api_key else (lambda url: url)  # video URLs
        self.models = models or {}  # "caption" -> Captioner, "vqa" -> QuestionAnswerer, "generate" -> ImageGenerator
        self._classifiers: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._checked = 0.0
        self._counting = threading.Lock()
        self.size = len(searcher.index)  # kept here: /healthz answers without touching the index
        self.roots = recorded_roots(searcher.index)  # the folders images may be served from
        self.video_step = video_step(searcher.index)  # None for images; kept here: no SQL on the event loop
        self.limiter = Limiter()  # caption, VQA and generate: one at work, a few waiting, 503 beyond

    def refresh(self) -> None:
        """Pick up items another process added or removed (checked at most once a second; call it in a thread).

        The FAISS back end says whether anything changed (one version read); only then are the items counted again
        (a scan of the table: milliseconds on 100k items, which every batch would otherwise pay once a second)."""
        now = time.monotonic()
        if now - self._checked <= 1.0:
            return
        self._checked = now
        refresh = getattr(self.searcher.index, "refresh", None)
        if refresh is not None and not refresh():
            return
        self.size = len(self.searcher.index)
        self.roots = recorded_roots(self.searcher.index)
        self.video_step = video_step(self.searcher.index)

    def count(self) -> None:
        """Count the items again (in a worker thread: the back end may wait for a lock or a database); one count at
        a time, so a flood of /healthz calls against a busy index does not take every worker thread."""
        if not self._counting.acquire(blocking=False):
            return
        try:
            self.size = len(self.searcher.index)
        finally:
            self._counting.release()

    def image_bytes(self, image_id: int) -> bytes:
        """What ``/v1/images/{id}`` sends: the file, if it may be served (``index.files``), without its metadata."""
        item = self.searcher.index.get([image_id])[0]
        if item is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        try:
            data = served_bytes(item["path"], item["offset"], item["size"], self.roots)
        except PermissionError as e:
            raise ApiError(403, f"image {image_id} is not served: {e}") from None
        except ValueError as e:
            raise ApiError(413, f"image {image_id} is not served: {e}") from None
        except OSError:
            raise ApiError(404, f"the file of image {image_id} is no longer on disk") from None
        if sniff_image_type(data) is None:
            raise ApiError(404, f"image {image_id} is not in a format this server sends")
        try:
            return strip_metadata(data, self.max_pixels)
        except Exception:  # noqa: BLE001 -- a broken file on disk is a missing image to the client, not a 500
            raise ApiError(404, f"image {image_id} could not be read as an image") from None

    def capabilities(self) -> dict[str, bool]:
        """What this server can do (the page shows caption, question and generate controls only where they work)."""
        base = {"search": True, "embed": True, "classify": True}
        return {**base, **{task: task in self.models for task in TASKS}}

    def model_for(self, task: str):
        """The model of an optional endpoint; 501 naming the option that enables it when the server has none."""
        if task not in self.models:
            what, option = TASKS[task]
            raise ApiError(501, f"{what} is not available: this server was started without a model for it; restart "
                                f"it with {option}")  # fmt: skip
        return self.models[task]

    def uploaded_image(self, image: bytes | None, endpoint: str) -> Image.Image:
        """The decoded image of a multipart request (every upload goes through the same checks; decoding takes up to
        a second for a large image: call it in a worker thread)."""
        if image is None:
            raise ApiError(400, f"multipart {endpoint} needs an image file in the field 'image'")
        return decode_upload(image, self.max_pixels)

    def indexed_image(self, image_id: Any) -> Image.Image:
        """The decoded image of an indexed item (read from disk: call it in a worker thread)."""
        item = self.searcher.index.get([check_id(image_id)])[0]
        if item is None:
            raise ApiError(404, f"no image with id {image_id} in the index")
        frame = frame_fields(item["key"])  # a video frame: decoded from its video at its time
        try:
            if frame is not None:
                return Image.fromarray(frame_at(frame["video"], frame["t"], FRAME_SIDE))
            return read_item_image(item["path"], item["offset"], item["size"])
        except (OSError, ValueError):
            raise ApiError(404, f"the file of image {image_id} is no longer readable on disk") from None

    async def query_image(self, kind: str, fields: dict[str, Any], image: bytes | None, endpoint: str) -> Image.Image:
        """The image a caption/VQA request is about: an upload (multipart) or ``image_id`` (JSON)."""
        if kind == "form":
            return await run_in_threadpool(self.uploaded_image, image, endpoint)
        return await run_in_threadpool(self.indexed_image, fields.get("image_id"))

    def embed_upload(self, image: bytes | None, endpoint: str) -> np.ndarray:
        """(1, dim) embedding of an uploaded image: decode and embed, both in the calling (worker) thread."""
        return self.searcher.embed_images([self.uploaded_image(image, endpoint)])

    def check_int(self, fields: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
        """An integer option from JSON or a form field (where it arrives as text), within [low, high]."""
        value = fields.get(name, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ApiError(400, f"'{name}' must be an integer from {low} to {high}, got {value!r}")
        return value

    def check_k(self, k: Any) -> int:
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ApiError(400, f"k must be an integer, got {k!r}")
        if not 1 <= k <= self.max_k:
            raise ApiError(400, f"k must be between 1 and {self.max_k}, got {k}")
        return k

    def check_texts(self, texts: Any, what: str = "text") -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, f"'{what}' must be a non-empty string or list of strings")
        if len(texts) > MAX_TEXTS:
            raise ApiError(400, f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
        if any(not t.strip() for t in texts):
            raise ApiError(400, f"empty {what}: every text needs at least one word")
        if any(len(t) > MAX_TEXT_CHARS for t in texts):
            raise ApiError(400, f"a {what} is longer than {MAX_TEXT_CHARS} characters")
        return texts

    def check_embedding(self, value: Any) -> np.ndarray:
        dim = self.searcher.index.dim
        try:
            vec = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            vec = np.zeros(0, np.float32)
        if vec.shape != (dim,) or not np.isfinite(vec).all() or not np.any(vec):
            raise ApiError(400, f"'embedding' must be a list of {dim} finite numbers, not all zero")
        return vec[None]  # (1, dim)

    def stored_vector(self, image_id: Any) -> np.ndarray:
        """(1, dim) vector of an indexed item (an index read: call it in a worker thread)."""
        image_id = check_id(image_id)
        try:
            return self.searcher.index.vectors([image_id])  # (1, dim)
        except KeyError:
            raise ApiError(404, f"no image with id {image_id} in the index") from None

    def results(self, vectors: np.ndarray, k: int) -> list[dict[str, Any]]:
        self.refresh()
        return self.format_hits(self.searcher.search_vectors(vectors, k)[0])

    def format_hits(self, hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The JSON of search results: id, score, caption, file name and the URL of the image."""
        return [
            {
                "id": h["id"],
                "score": round(h["score"], 6),
                "caption": h["caption"],
                "name": os.path.basename(h["key"].rpartition("#")[2] or h["key"]),
                "url": f"/v1/images/{h['id']}",
                **video_hit_fields(h, self.sign),  # a video frame: its video, time, shot and URLs
            }
            for h in hits
        ]

    def search_answer(self, query: str, k: int, hits: list[dict[str, Any]], t0: float) -> Response:
        """The JSON answer of ``/v1/search``, encoded here.

        Why not return the dict: FastAPI would validate and re-encode it through pydantic on the event loop (a few
        per cent of the loop's time in a profile at 16 concurrent searches), where one ``json.dumps`` of a few hits
        is all the answer needs."""
        body = {
            "query": query,
            "k": k,
            "results": self.format_hits(hits),
            "search_ms": round(1e3 * (time.perf_counter() - t0), 3),
            **moments_field(self.video_step, hits, self.sign),
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    def classifier(self, labels: tuple[str, ...]):
        """(E, K) zero-shot weights for ``labels``, cached (a page asks for the same labels again and again)."""

        with self._lock:
            if labels in self._classifiers:
                self._classifiers.move_to_end(labels)
                return self._classifiers[labels]
        weights = zero_shot_classifier(self.searcher.model, self.searcher.tokenizer, list(labels)).numpy()
        with self._lock:
            self._classifiers[labels] = weights
            while len(self._classifiers) > 64:
                self._classifiers.popitem(last=False)
        return weights

    def classify(self, image_emb: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
        import torch

        weights = self.classifier(tuple(labels))  # (E, K)
        with torch.inference_mode():
            scale = logit_scale_of(self.searcher.model)
        logits = scale * (image_emb @ weights)[0]  # (K,)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        return [{"label": labels[i], "probability": float(probs[i])} for i in order]


IMAGE_FILE = {"type": "string", "format": "binary"}  # an uploaded image in a multipart form


def request_body(
    json_props: dict[str, Any],
    example: dict[str, Any],
    form_props: dict[str, Any] | None = None,
    json_required: list[str] | None = None,
    form_required: list[str] | None = None,
) -> dict[str, Any]:
    """An OpenAPI request body: a JSON object, and a multipart form too where the endpoint takes an upload."""

    def schema(props: dict[str, Any], required: list[str] | None) -> dict[str, Any]:
        return {"type": "object", "properties": props, **({"required": required} if required else {})}

    content: dict[str, Any] = {"application/json": {"schema": schema(json_props, json_required), "example": example}}
    if form_props is not None:
        content["multipart/form-data"] = {"schema": schema(form_props, form_required)}
    return {"required": True, "content": content}


SEARCH_BODY = request_body(
    {
        "text": {"type": "string", "description": "query text"},
        "embedding": {"type": "array", "items": {"type": "number"}, "description": "query vector"},
        "image_id": {"type": "integer", "description": "search with an indexed image"},
        "k": {"type": "integer", "default": 10, "minimum": 1},
    },
    {"text": "a red circle", "k": 10},
    form_props={"image": IMAGE_FILE, "k": {"type": "integer"}},
    form_required=["image"],
)
EMBED_BODY = request_body(
    {"texts": {"type": "array", "items": {"type": "string"}}},
    {"texts": ["a red circle", "a blue square"]},
    form_props={"image": IMAGE_FILE},
)
CLASSIFY_BODY = request_body(
    {"image_id": {"type": "integer"}, "labels": {"type": "array", "items": {"type": "string"}}},
    {"image_id": 1, "labels": ["red circle", "blue square"]},
    form_props={"image": IMAGE_FILE, "labels": {"type": "string", "description": "comma-separated labels"}},
)
CAPTION_BODY = request_body(
    {
        "image_id": {"type": "integer", "description": "caption an indexed image"},
        "max_length": {"type": "integer", "default": 20, "minimum": 1, "maximum": MAX_CAPTION_TOKENS},
        "beam": {"type": "integer", "default": 1, "minimum": 1, "maximum": MAX_BEAM},
    },
    {"image_id": 1},
    form_props={"image": IMAGE_FILE},
)
VQA_BODY = request_body(
    {
        "image_id": {"type": "integer"},
        "question": {"type": "string"},
        "top_k": {"type": "integer", "default": 1, "minimum": 1, "maximum": MAX_ANSWERS},
    },
    {"image_id": 1, "question": "what colour is the circle?"},
    form_props={"image": IMAGE_FILE, "question": {"type": "string"}},
)
GENERATE_BODY = request_body(
    {
        "prompt": {"type": "string", "description": "what to draw, worded like the training captions"},
        "n": {"type": "integer", "default": 4, "minimum": 1, "maximum": MAX_GENERATE},
        "seed": {"type": "integer", "minimum": 0, "description": "the same seed gives the same images"},
        "format": {"type": "string", "enum": list(GENERATE_FORMATS), "default": "png"},
    },
    {"prompt": "a photo of a sneaker.", "n": 8, "seed": 0, "format": "json"},
    json_required=["prompt"],
)


async def read_body(request: Request, max_body: int) -> tuple[str, dict[str, Any], bytes | None]:
    """("json" | "form", fields, uploaded image bytes or None); 415 for any other content type, 400 if malformed."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError):  # not JSON, not UTF-8, a number of 4,300+ digits, nesting too deep
            raise ApiError(400, "the body is not valid JSON (or nests too deep, or holds a number too long)") from None
        if not isinstance(body, dict):
            raise ApiError(400, 'the JSON body must be an object, e.g. {"text": "a red circle", "k": 10}')
        return "json", body, None
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16, max_part_size=max_body)
        fields: dict[str, Any] = {}
        image = None
        for name, value in form.multi_items():
            if hasattr(value, "read"):  # an uploaded file
                if name != "image":
                    raise ApiError(400, f"unexpected file field {name!r}; upload the image as 'image'")
                image = await value.read()
            else:
                fields[name] = value
        return "form", fields, image
    raise ApiError(415, f"unsupported content type {ctype or 'none'!r}; send application/json or multipart/form-data")


def create_app(
    index_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    api_key: str | None = None,
    max_upload_mb: float = 10.0,
    max_k: int = 1000,
    max_pixels: int = 40_000_000,
    device: str = "cpu",
    caption_model: str | os.PathLike | None = None,
    vqa_model: str | os.PathLike | None = None,
    generate_model: str | os.PathLike | None = None,
    allowed_hosts: list[str] | None = None,
    max_queue: int = 1024,
    body_timeout: float = BODY_TIMEOUT,
    read_model: str | os.PathLike | None = None,
    precision: str = "auto",
) -> FastAPI:
    """The FastAPI app serving one index.

    Args:
        index_dir: the index directory.
        model_dir: the model; default the one that built the index.
        api_key: when set, every endpoint but ``/healthz`` needs it.
        max_upload_mb: the largest request body accepted (413 above).
        max_k: the most results one search returns.
        max_pixels: the largest image (width × height) decoded; larger ones are refused as decompression bombs.
        device: where the models run.
        caption_model: a captioning (CoCa) model directory: turns on ``/v1/caption`` (else it answers 501).
        vqa_model: a VQA model directory: turns on ``/v1/vqa`` (else it answers 501).
        generate_model: a text-to-image GAN run or model directory: turns on ``/v1/generate`` (else it answers 501).
        allowed_hosts: the names a ``Host`` header may carry (``vislang serve`` passes localhost and 127.0.0.1 by
            default); None accepts any (tests, or a server behind a proxy that checks).
        max_queue: most searches waiting for the batcher; more are answered 503 with ``Retry-After``.
        body_timeout: seconds a client may take to send its request body (408 after).
        read_model: a reading model directory: turns on ``/v1/read`` and ``/v1/translate`` (else they answer 501).
        precision: what queries are embedded in: ``auto`` (bf16 where it pays and agrees with fp32), ``fp32``, ``bf16``.
    """

    # read-only: the server never writes the index; several server processes share its memory-mapped vectors
    searcher = Searcher(index_dir, model_dir, device=device, precision=precision, read_only=True)
    searcher.model  # noqa: B018 -- load now: the first request must not pay for it, nor race to load it twice
    searcher.text_precision  # noqa: B018 -- settled now too: a trial inside a request would stall its batch
    models: dict[str, Any] = {}  # loaded now too, so a wrong directory stops the server before it listens
    if caption_model is not None:
        models["caption"] = Captioner(caption_model, device)
    if vqa_model is not None:
        models["vqa"] = QuestionAnswerer(vqa_model, device)
    if generate_model is not None:
        models["generate"] = ImageGenerator(generate_model, device)
    if read_model is not None:
        models["read"] = ReadingModel(read_model, device)
    svc = Service(searcher, max_k, max_pixels, models, api_key)
    batcher = SearchBatcher(searcher.embed_texts, searcher.search_vectors, before_batch=svc.refresh,
                            max_queue=max_queue, timeout=SEARCH_TIMEOUT)  # fmt: skip
    max_body = int(max_upload_mb * 2**20)
    swagger_assets = local_swagger_ui()
    app = FastAPI(
        title="vislang",
        version="1",
        description="Search images by text or image, embed, and classify zero-shot with a vislang model.",
        docs_url=None if swagger_assets else "/docs",  # with the assets installed, /docs is served from them below
        redoc_url=None,  # ReDoc's script only comes from a CDN, which offline machines cannot reach
    )
    if swagger_assets:
        from fastapi.openapi.docs import get_swagger_ui_html
        from fastapi.staticfiles import StaticFiles

        app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_assets), name="docs-assets")

        @app.get("/docs", include_in_schema=False)
        async def docs() -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url="/openapi.json",
                title="vislang API",
                swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            )

    app.state.service = svc
    app.state.batcher = batcher
    app.add_middleware(Guard, api_key=api_key, max_body=max_body, allowed_hosts=allowed_hosts,
                       body_timeout=body_timeout)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "invalid request", details=json.loads(json.dumps(exc.errors(), default=str)))

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return error(503, str(exc), {"Retry-After": RETRY_AFTER})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error ({exc.__class__.__name__}); the server log has the details")

    @app.get("/healthz", summary="liveness, index size, search queue and which endpoints this server can answer")
    async def healthz() -> JSONResponse:
        # the size is counted in a thread; a busy index delays this answer by half a second at most (then: last count)
        await asyncio.wait({asyncio.get_running_loop().run_in_executor(None, svc.count)}, timeout=0.5)
        alive = batcher.alive
        body = {
            "status": "ok" if alive else "search worker stopped",
            "size": svc.size,
            "dim": searcher.index.dim,
            "search_worker": "alive" if alive else "dead",
            "search_queue": batcher.depth,
            "pid": os.getpid(),  # which server process answered (--workers N runs N of them)
            "capabilities": svc.capabilities(),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY"})

    @app.post(
        "/v1/search",
        summary="search by text, uploaded image, indexed image or embedding",
        openapi_extra={"requestBody": SEARCH_BODY},
    )
    async def search(request: Request) -> Response:
        kind, fields, image = await read_body(request, max_body)
        k = svc.check_k(fields.get("k", 10))
        if kind == "form":
            query, vec = "image", await run_in_threadpool(svc.embed_upload, image, "search")
        else:
            given = [f for f in ("text", "embedding", "image_id") if fields.get(f) is not None]
            if len(given) != 1:
                raise ApiError(400, "give exactly one of 'text', 'embedding' or 'image_id' (or upload an 'image')")
            query = given[0]
            if query == "text":
                text = svc.check_texts(fields["text"])
                if len(text) != 1:
                    raise ApiError(400, "search takes one 'text'")
                t0 = time.perf_counter()  # text: embedded with the other queries waiting, in the batcher
                return svc.search_answer(query, k, await answered(batcher.submit(k, text=text[0])), t0)
            elif query == "embedding":
                vec = svc.check_embedding(fields["embedding"])
            else:
                vec = await run_in_threadpool(svc.stored_vector, fields["image_id"])
        t0 = time.perf_counter()
        return svc.search_answer(query, k, await answered(batcher.submit(k, vector=vec[0])), t0)

    @app.post("/v1/embed", summary="embed texts or an uploaded image", openapi_extra={"requestBody": EMBED_BODY})
    async def embed(request: Request) -> dict[str, Any]:
        kind, fields, image = await read_body(request, max_body)
        if kind == "form":
            vec = await run_in_threadpool(svc.embed_upload, image, "embed")
        else:
            vec = await run_in_threadpool(searcher.embed_texts, svc.check_texts(fields.get("texts"), "texts"))
        return {"dim": int(vec.shape[1]), "embeddings": vec.round(7).tolist()}

    @app.post(
        "/v1/classify",
        summary="zero-shot classification of an uploaded or indexed image",
        openapi_extra={"requestBody": CLASSIFY_BODY},
    )
    async def classify(request: Request) -> dict[str, Any]:
        kind, fields, image = await read_body(request, max_body)
        labels = fields.get("labels")
        if isinstance(labels, str):
            labels = [s.strip() for s in labels.split(",") if s.strip()]
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x.strip() for x in labels):
            raise ApiError(400, "'labels' must hold at least two non-empty labels, e.g. 'red circle,blue square'")
        if len(labels) > MAX_LABELS:
            raise ApiError(400, f"at most {MAX_LABELS} labels, got {len(labels)}")
        svc.check_texts(labels, "label")
        if kind == "form":
            vec = await run_in_threadpool(svc.embed_upload, image, "classify")
        else:
            vec = await run_in_threadpool(svc.stored_vector, fields.get("image_id"))
        return {"labels": await run_in_threadpool(svc.classify, vec, labels)}

    add_reading_routes(app, svc, read_body, max_body)  # /v1/read, /v1/translate

    @app.post(
        "/v1/caption",
        summary="caption an uploaded or indexed image (needs --caption-model; 501 without)",
        openapi_extra={"requestBody": CAPTION_BODY},
    )
    async def caption(request: Request) -> dict[str, Any]:
        captioner = svc.model_for("caption")
        kind, fields, image = await read_body(request, max_body)
        longest = min(MAX_CAPTION_TOKENS, captioner.max_tokens)
        max_length = svc.check_int(fields, "max_length", min(20, longest), 1, longest)
        beam = svc.check_int(fields, "beam", 1, 1, MAX_BEAM)
        async with svc.limiter:
            img = await svc.query_image(kind, fields, image, "caption")
            return {"caption": await run_in_threadpool(captioner, img, max_length, beam)}

    @app.post(
        "/v1/vqa",
        summary="answer a question about an uploaded or indexed image (needs --vqa-model; 501 without)",
        openapi_extra={"requestBody": VQA_BODY},
    )
    async def vqa(request: Request) -> dict[str, Any]:
        answerer = svc.model_for("vqa")
        kind, fields, image = await read_body(request, max_body)
        question = svc.check_texts(fields.get("question"), "question")
        if len(question) != 1:
            raise ApiError(400, "ask one 'question' per request")
        top_k = svc.check_int(fields, "top_k", 1, 1, MAX_ANSWERS)
        async with svc.limiter:
            img = await svc.query_image(kind, fields, image, "vqa")
            try:
                answers = await run_in_threadpool(answerer, img, question[0], top_k)
            except ValueError as e:  # the question does not fit the model (too many tokens)
                raise ApiError(400, str(e)) from None
        return {"question": question[0], "answers": answers}

    @app.post(
        "/v1/generate",
        summary="draw n images of a prompt: one grid PNG or base64 PNGs in JSON (needs --generate-model; 501 without)",
        openapi_extra={"requestBody": GENERATE_BODY},
        responses={200: {"content": {"image/png": {}, "application/json": {}}}},
    )
    async def generate(request: Request) -> Response:
        generator = svc.model_for("generate")
        _, fields, _ = await read_body(request, max_body)
        prompt = fields.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, f"'prompt' must be a string saying what to draw, e.g. \"a photo of a sneaker\"; "
                                f"got {prompt!r}")  # fmt: skip
        if len(prompt) > MAX_TEXT_CHARS:
            raise ApiError(400, f"the prompt is longer than {MAX_TEXT_CHARS} characters; write a shorter one")
        n = svc.check_int(fields, "n", 4, 1, MAX_GENERATE)
        seed = None if fields.get("seed") is None else svc.check_int(fields, "seed", 0, 0, 2**63 - 1)
        fmt = fields.get("format", "png")
        if fmt not in GENERATE_FORMATS:
            raise ApiError(400, f"'format' must be 'png' (one grid image) or 'json' (base64 PNGs), got {fmt!r}")
        try:  # the library's prompt checks: empty, or no word the text tower was trained on
            async with svc.limiter:
                images, notes = await run_in_threadpool(generator, prompt, n, seed)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if fmt == "png":
            data = await run_in_threadpool(generator.grid_png, images)
            return Response(data, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})
        pngs = await run_in_threadpool(lambda: [generator.png(x) for x in images])
        return JSONResponse(
            {
                "prompt": prompt.strip(),
                "n": n,
                "seed": seed,
                "width": int(images.shape[3]),
                "height": int(images.shape[2]),
                "media_type": "image/png",
                "images": [base64.b64encode(p).decode("ascii") for p in pngs],
                "warnings": notes,
            }
        )

    @app.get(
        "/v1/images/{image_id}",
        summary="the image file of an indexed item",
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
    )
    async def image_file(image_id: str) -> Response:
        # ids are ASCII integers ("²".isdigit() is true too): nothing else reaches the index or the file system
        if not (image_id.isascii() and image_id.isdigit()) or len(image_id) > 18:
            raise ApiError(404, f"no image with id {image_id[:40]!r}; ids are the integers search returns")
        data = await run_in_threadpool(svc.image_bytes, int(image_id))
        return Response(
            data,
            media_type=sniff_image_type(data),
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
        )

    add_video_routes(app, searcher, ApiError)  # /v1/frames/{id}, /v1/videos/{id}: serve/video.py

    return app
