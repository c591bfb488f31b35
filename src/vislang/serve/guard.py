"""What stands between the network and the endpoints: the Host and cross-site checks, the API key, the body cap and
deadline (``Guard``), bounded waiting for slow work (``Limiter``, ``answered``), and the one JSON error shape,
``{"error": message, "status": code}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import parse_qs

from fastapi import HTTPException
from fastapi.responses import JSONResponse

OPEN_PATHS = ("/healthz",)  # reachable without the API key
HTML_PATHS = ("/", "/docs", "/openapi.json")  # a browser asking for these gets a login prompt
SEARCH_TIMEOUT = 30.0  # seconds a search may wait for the batcher before it is answered 503
BODY_TIMEOUT = 30.0  # seconds a client may take to send its request body (slow-loris senders get 408)
RETRY_AFTER = "1"  # seconds, in the 503 answers of a full queue
SIGNED_PREFIX = "/v1/videos/"  # a <video> element cannot send the key: these URLs carry a signature instead
SIGNED_TTL = 3600  # seconds a signed URL stays good (a search result page is watched for a while, then redone)


class ApiError(HTTPException):
    """An error answered as ``{"error": detail, "status": code}``."""


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, **extra}, status_code=status, headers=headers)


def key_matches(headers: dict[str, str], api_key: str) -> bool:
    """Whether a request carries the key: ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or Basic (password)."""
    want = api_key.encode()
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except ValueError:
            given = ""
    return hmac.compare_digest(given.encode(), want)


def _signature(api_key: str, path: str, expires: int) -> str:
    return hmac.new(api_key.encode(), f"{path}|{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def sign_url(api_key: str, url: str, now: float | None = None) -> str:
    """``url`` (a path under ``SIGNED_PREFIX``, maybe with a ``#t=`` fragment) with ``?exp=...&sig=...`` added: an
    HMAC of the path and the expiry under the API key, good for ``SIGNED_TTL`` seconds and for that path only.

    Why: the search page sends the key in a header with ``fetch``, but a ``<video>`` element fetches its own ranges
    and sends no header; fetching the whole file into a blob instead would load an hour-long film to play a shot."""
    path, hash_, fragment = url.partition("#")
    expires = int(time.time() if now is None else now) + SIGNED_TTL
    return f"{path}?exp={expires}&sig={_signature(api_key, path, expires)}{hash_}{fragment}"


def signature_valid(api_key: str, path: str, query: str, now: float | None = None) -> bool:
    """Whether ``path?query`` is a URL ``sign_url`` made with this key that has not expired."""
    if not path.startswith(SIGNED_PREFIX):
        return False
    q = parse_qs(query)
    exp, sig = q.get("exp", [""])[0], q.get("sig", [""])[0]
    if not exp.isdigit() or int(exp) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(sig.encode(), _signature(api_key, path, int(exp)).encode())


class Guard:
    """ASGI middleware: the Host check, the cross-site check, the API key, then the body size cap (413 before the
    body is read, if announced) and the body deadline (408).

    The body is read here in full (it is at most ``max_body`` bytes) and replayed to the app, so a client that sends
    more than it announced, or announces nothing, is cut off at the cap as well.

    Why the Host check: a page on another site can point its own domain at 127.0.0.1 (DNS rebinding) and read a
    key-less local server as same-origin; it cannot make the browser send ``Host: localhost``. Why the cross-site
    check: a browser attaches cached Basic credentials to a form another site posts here, so a state-changing
    request whose ``Origin`` is another site, or that the browser marks ``Sec-Fetch-Site: cross-site``, is refused.
    """

    def __init__(
        self,
        app,
        api_key: str | None,
        max_body: int,
        allowed_hosts: list[str] | None = None,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        self.app, self.api_key, self.max_body, self.body_timeout = app, api_key, max_body, body_timeout
        self.allowed_hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

    def refusal(self, scope, headers: dict[str, str]) -> JSONResponse | None:
        """The answer to a request refused before the app sees it, else None."""
        host = host_name(headers.get("host", ""))
        if self.allowed_hosts is not None and "*" not in self.allowed_hosts and host not in self.allowed_hosts:
            return error(400, f"the Host header {host[:100]!r} is not one this server answers to; start it with "
                              f"--allowed-host {host[:100] or 'NAME'} if that is its name")  # fmt: skip
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            foreign = origin is not None and host_name(origin) != host  # "null" (a sandboxed frame) is foreign too
            if foreign or headers.get("sec-fetch-site") == "cross-site":
                return error(403, "cross-site requests are refused; call the API from this server's page or a client")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        refused = self.refusal(scope, headers)
        if refused is not None:
            return await refused(scope, receive, send)
        if (
            self.api_key
            and path not in OPEN_PATHS
            and not key_matches(headers, self.api_key)
            and not (
                scope["method"] in ("GET", "HEAD")
                and signature_valid(self.api_key, path, scope.get("query_string", b"").decode("latin-1"))
            )
        ):
            scheme = "Basic" if path in HTML_PATHS and scope["method"] == "GET" else "Bearer"
            message = "missing or wrong API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            return await error(401, message, {"WWW-Authenticate": f'{scheme} realm="vislang"'})(scope, receive, send)
        length = headers.get("content-length")
        too_big = f"request body over the limit of {self.max_body / 2**20:g} MB; send a smaller image"
        if length is not None:
            if not length.isdigit():
                return await error(400, "invalid Content-Length header")(scope, receive, send)
            if int(length) > self.max_body:
                return await error(413, too_big)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except (asyncio.TimeoutError, TimeoutError):
                slow = error(408, f"the request body took over {self.body_timeout:g} s to arrive; send it at once")
                return await slow(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await error(413, too_big)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class Limiter:
    """At most ``running`` requests at work and ``waiting`` queued behind them; more are answered 503 at once.

    Why: each generative request holds a worker thread for seconds; without a bound, a burst would take every
    thread of the shared pool (searches and uploads wait for those too) and queue for minutes.
    """

    def __init__(self, running: int = 1, waiting: int = 4) -> None:
        self._slots = asyncio.Semaphore(running)
        self.capacity, self.inside = running + waiting, 0

    async def __aenter__(self) -> None:
        if self.inside >= self.capacity:
            raise ApiError(503, "the server is busy with other requests of this kind; retry in a moment",
                           headers={"Retry-After": RETRY_AFTER})  # fmt: skip
        self.inside += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self.inside -= 1
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()
        self.inside -= 1


async def answered(future, timeout: float = SEARCH_TIMEOUT) -> Any:
    """The result of a batcher future; 503 when it waited too long (the future is cancelled and dropped)."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        raise ApiError(503, "the search took too long under the current load; retry in a moment",
                       headers={"Retry-After": RETRY_AFTER}) from None  # fmt: skip


def host_name(value: str) -> str:
    """The host of a ``Host`` / ``Origin`` value, lower case, without port, scheme or IPv6 brackets."""
    value = value.strip().lower().partition("://")[2] or value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")]
    return value.partition(":")[0].rstrip(".")
