"""The HTTP side of video indexes: frame images, the video file (range requests, so a browser can seek), and the
moment fields added to search results. Kept apart from app.py, which only calls ``add_video_routes`` and
``video_hit_fields``."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..index.build import recorded_roots
from ..index.files import servable_path
from ..index.video import frame_fields, moments_of
from ..video.reader import VIDEO_EXTS, frame_at

FRAME_SIDE = 480  # longer side of a frame decoded for the page or for a caption / VQA request about it
MEDIA = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska",
         ".mov": "video/quicktime", ".avi": "video/x-msvideo"}  # fmt: skip


def _unsigned(url: str) -> str:
    return url


def video_hit_fields(hit: dict[str, Any], sign: Callable[[str], str] = _unsigned) -> dict[str, Any]:
    """Extra JSON fields of a search hit that is a video frame (none for an image): the video's name, the frame's time
    and shot, and URLs of the frame and of the video playing from the frame's shot (``sign``: the server's
    ``guard.sign_url`` under an API key, so a ``<video>`` element may fetch it without the key)."""
    f = frame_fields(hit["key"])
    if f is None:
        return {}
    name, i = Path(f["video"]).name, hit["id"]
    return {"name": name, "video": name, "t": f["t"], "shot": f["shot"], "shot_start": f["shot_start"],
            "shot_end": f["shot_end"], "url": f"/v1/frames/{i}",
            "video_url": sign(f"/v1/videos/{i}#t={f['shot_start']:.2f},{f['shot_end']:.2f}")}  # fmt: skip


def moments_field(
    step: float | None, hits: list[dict[str, Any]], sign: Callable[[str], str] = _unsigned
) -> dict[str, Any]:
    """``{"moments": [...]}`` for the raw hits (with ``key``) of a video index whose frames are ``step`` seconds
    apart (``index.video.video_step``; adjacent frames merged); ``{}`` for an image index (``step`` None)."""
    if step is None:
        return {}
    moments = moments_of(hits, step)
    for m in moments:
        m["video"] = Path(m["video"]).name
        m["url"] = f"/v1/frames/{m['id']}"
        m["video_url"] = sign(f"/v1/videos/{m['id']}#t={m['start']:.2f},{m['end']:.2f}")
    return {"moments": moments}


def add_video_routes(app: FastAPI, searcher: Any, error: type[HTTPException]) -> None:
    """``GET /v1/frames/{id}`` (JPEG of an indexed frame) and ``GET /v1/videos/{id}`` (the frame's video file)."""

    def frame_item(item_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The index item and frame fields of ``item_id`` if its video may be served (runs in a worker thread)."""
        if not item_id.isdigit() or len(item_id) > 18:  # ids are integers: nothing else reaches the file system
            raise error(404, f"no frame with id {item_id!r}; ids are the integers search returns")
        item = searcher.index.get([int(item_id)])[0]
        fields = frame_fields(item["key"]) if item is not None else None
        if fields is None:
            raise error(404, f"no video frame with id {item_id} in the index")
        try:  # the checks /v1/images makes (index.files): inside the folders the build recorded, no symlink
            servable_path(fields["video"], recorded_roots(searcher.index))
        except PermissionError as e:
            raise error(403, f"the video of frame {item_id} is not served: {e}") from None
        if not Path(fields["video"]).is_file():
            raise error(404, f"the video of frame {item_id} is no longer on disk")
        return item, fields

    @app.get("/v1/frames/{item_id}", summary="the picture of an indexed video frame (JPEG)",
             responses={200: {"content": {"image/jpeg": {}}}})  # fmt: skip
    async def frame_image(item_id: str) -> Response:
        _, f = await run_in_threadpool(frame_item, item_id)  # index reads stay off the event loop
        try:
            rgb = await run_in_threadpool(frame_at, f["video"], f["t"], FRAME_SIDE)
        except ValueError:
            raise error(404, f"the video of frame {item_id} can no longer be decoded") from None
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=88)
        return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/videos/{item_id}", summary="the video file of an indexed frame (supports range requests)",
             responses={200: {"content": {"video/mp4": {}}}})  # fmt: skip
    async def video_file(item_id: str) -> Response:
        _, f = await run_in_threadpool(frame_item, item_id)  # index reads stay off the event loop
        suffix = Path(f["video"]).suffix.lower()
        if suffix not in VIDEO_EXTS:
            raise error(404, f"frame {item_id} does not come from a video file")
        return FileResponse(f["video"], media_type=MEDIA.get(suffix, "application/octet-stream"))
