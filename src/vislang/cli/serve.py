"""`vislang serve`: the HTTP API and search page over an index, with uvicorn."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import textwrap

SERVE_EPILOG = """
    examples:
      vislang serve --index photos.index                       # http://127.0.0.1:8000/ (docs at /docs)
      vislang serve --index photos.index --workers 2 --threads 1  # two processes, one shared index
      VISLANG_API_KEY=secret vislang serve --index photos.index --host 0.0.0.0 --port 8080 \\
          --allowed-host photos.example.org                       # behind a TLS proxy; see README
      vislang serve --index photos.index --caption-model runs/caption/model \\
          --vqa-model runs/ablate-fusion/cross_attention/model       # + /v1/caption, /v1/vqa
      vislang serve --index photos.index --generate-model runs/gan-fm   # + /v1/generate
      vislang serve --index photos.index --read-model runs/read-zh/model  # + /v1/read, /v1/translate
      curl -s localhost:8000/v1/translate -F image=@docs/img/read-zh-sample.png
      curl -s localhost:8000/v1/generate -H 'content-type: application/json' \\
          -d '{"prompt": "a photo of a sneaker.", "n": 16, "seed": 0}' -o runs/grid.png
      curl -s localhost:8000/v1/search -H 'content-type: application/json' -d '{"text": "a red shoe", "k": 5}'
    Needs the serve extra: pip install 'vislang[serve]'."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WILDCARDS = ("0.0.0.0", "::", "")


def allowed_hosts(host: str, extra: list[str] | None) -> list[str]:
    """The Host names the server answers to: this machine's loopback names, the bound address, and ``extra``.

    Why: a page on another site can point its own domain at 127.0.0.1 (DNS rebinding); its requests then carry
    that domain as Host, which this list refuses. A public name (behind a proxy) must be given with --allowed-host.
    """
    names = ["localhost", "127.0.0.1", "::1"]
    if host not in WILDCARDS:
        names.append(host)
    return names + list(extra or [])


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve a non-loopback address without a key: anyone who reaches the port would read every image."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach this port could search and read "
            "the indexed images; set --api-key or VISLANG_API_KEY (or bind 127.0.0.1 and put a proxy in front)"
        )


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        import uvicorn  # noqa: F401 -- checked here: a missing extra is named before anything loads

        from ..serve.workers import serve  # lazy: `vislang --help` starts without loading torch
    except ModuleNotFoundError as e:
        raise RuntimeError(f"`vislang serve` needs {e.name}: pip install 'vislang[serve]'") from e
    api_key = args.api_key or os.environ.get("VISLANG_API_KEY") or None
    check_exposure(args.host, api_key)
    hosts = allowed_hosts(args.host, args.allowed_host)
    if args.host in WILDCARDS and not args.allowed_host:
        print(f"note: answering only Host {', '.join(hosts)}; add --allowed-host NAME for the names clients use",
              file=sys.stderr)  # fmt: skip
    app_config = {
        "index_dir": args.index,
        "model_dir": args.model,
        "api_key": api_key,
        "max_upload_mb": args.max_upload_mb,
        "max_k": args.max_k,
        "device": args.device,
        "caption_model": args.caption_model,
        "vqa_model": args.vqa_model,
        "generate_model": args.generate_model,
        "allowed_hosts": hosts,
        "body_timeout": args.body_timeout,
        "read_model": args.read_model,
        "precision": args.precision,
    }
    serve(
        app_config,
        args.workers,
        args.threads,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        limit_concurrency=args.limit_concurrency,  # connections + requests at once; more are answered 503
        timeout_keep_alive=args.timeout_keep_alive,  # idle connections closed: a client cannot hold slots for free
        h11_max_incomplete_event_size=64 * 1024,  # request line + headers: a header flood is cut off at 64 KB
    )
    return 0


def register(add) -> None:
    """Add the `serve` subcommand (``add(name, help, fn) -> ArgumentParser``)."""
    sp = add(
        "serve",
        "serve an index over HTTP: search API, embed, zero-shot classify, caption, VQA, generate, and a search page",
        cmd_serve,
    )
    sp.epilog = textwrap.dedent(SERVE_EPILOG)
    sp.add_argument("--index", required=True, help="index directory (from `vislang index build`)")
    sp.add_argument("--model", help="model directory (default: the one that built the index)")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", help="require this key on every endpoint but /healthz (default: $VISLANG_API_KEY); "
                    "needed to bind anything but loopback")  # fmt: skip
    sp.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="a Host name clients use besides localhost/127.0.0.1 (repeatable; '*': any)")  # fmt: skip
    sp.add_argument("--limit-concurrency", type=int, default=64,
                    help="most connections at once; more are answered 503 (default 64)")  # fmt: skip
    sp.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a client may take to send a request body; slower: 408 (default 30)")  # fmt: skip
    sp.add_argument("--timeout-keep-alive", type=int, default=5, help="seconds an idle connection stays open (5)")
    sp.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body (default 10 MB)")
    sp.add_argument("--max-k", type=int, default=1000, help="most results per search (default 1000)")
    sp.add_argument("--caption-model", help="captioning (CoCa) model directory: turns on /v1/caption (else 501)")
    sp.add_argument("--vqa-model", help="VQA model directory: turns on /v1/vqa (else 501)")
    sp.add_argument("--generate-model", help="text-to-image GAN run or model folder: turns on /v1/generate (else 501)")
    sp.add_argument("--read-model", help="reading model directory (train --config read-zh): turns on /v1/read and "
                    "/v1/translate")  # fmt: skip
    sp.add_argument("--device", default="cpu")
    sp.add_argument("--workers", type=int, default=1,
                    help="server processes sharing the port and the (memory-mapped) index (default 1)")  # fmt: skip
    sp.add_argument("--threads", type=int,
                    help="compute threads per process (default: half the cores over the workers, >= 1)")  # fmt: skip
    sp.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="query embedding precision (auto: bf16 where it pays and agrees with fp32)")  # fmt: skip
    sp.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
