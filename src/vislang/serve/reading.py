"""``/v1/read`` and ``/v1/translate``: the text in an uploaded or indexed image, and its English through CC-CEDICT.

A thin layer over :mod:`vislang.models.reading`, the code ``vislang read`` and ``vislang translate`` run: the reader is
loaded once when the server starts (``vislang serve --read-model DIR``), each request runs one read. The routes live
here, not in ``app.py``; ``create_app`` adds them with ``add_reading_routes`` and passes in its request parsing, so
every upload goes through the server's own checks (size, type, pixel limit: 4xx answers, never a 500).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..models.reading import Reader, translate

READ_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}},
        },
        "application/json": {
            "schema": {"type": "object", "properties": {"image_id": {"type": "integer"}}},
        },
    },
    "required": True,
}


class ReadingModel:
    """A reading model directory (``vislang train --config read-zh``), ready to read one image at a time."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu") -> None:
        self.reader = Reader(model_dir, device)
        self._lock = threading.Lock()  # compute-bound: two reads at once only make both slower

    def __call__(self, image: Image.Image, with_translation: bool = False) -> dict[str, Any]:
        with self._lock:
            reading = self.reader.read([image])[0]
        out = reading.as_dict()
        if with_translation:
            out.update(translate(reading.text) if reading.has_text else {"pinyin": "", "english": "", "words": []})
        return out


def add_reading_routes(app: FastAPI, svc: Any, read_body: Callable[..., Awaitable[tuple]], max_body: int) -> None:
    """Add ``/v1/read`` and ``/v1/translate`` to ``app``; ``svc`` is the server's Service (models, image checks)."""

    async def answer(request: Request, with_translation: bool) -> dict[str, Any]:
        reader = svc.model_for("read")
        kind, fields, image = await read_body(request, max_body)
        async with svc.limiter:  # the model endpoints' shared limiter (serve/guard.py): 503 when busy, not a queue
            img = await svc.query_image(kind, fields, image, "translate" if with_translation else "read")
            return await run_in_threadpool(reader, img, with_translation)

    @app.post(
        "/v1/read",
        summary="the text in an uploaded or indexed image, with a confidence (needs --read-model; 501 without)",
        openapi_extra={"requestBody": READ_BODY},
    )
    async def read(request: Request) -> dict[str, Any]:
        return await answer(request, False)

    @app.post(
        "/v1/translate",
        summary="read the Chinese in an image and give pinyin and English (CC-CEDICT; needs --read-model)",
        openapi_extra={"requestBody": READ_BODY},
    )
    async def translate_image(request: Request) -> dict[str, Any]:
        return await answer(request, True)
