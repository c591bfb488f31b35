"""Running the app in one or several server processes, and how many threads each one computes with.

Why several processes: one process answers HTTP on one event loop and embeds and searches on one batcher thread,
both under one GIL, so past a point more cores do not help it. ``vislang serve --workers N`` starts N processes that
accept from one socket (uvicorn's supervisor); each loads the model and opens the index read-only, whose vectors
file is memory-mapped, so the N share one copy of the vectors in the page cache, and each picks up ``index add``
commits by itself (``Service.refresh``).

Why set threads: torch and FAISS each keep an OpenMP pool as large as the machine. Next to an event loop, and the
other workers, those pools oversubscribe the cores: on the 2-core test machine, FAISS with 2 threads searched a batch
of 16 queries in 150-200 ms under load against 18-25 ms with 1. So each process computes with its share of the cores
(``default_threads``) unless told otherwise.
"""

from __future__ import annotations

import gc
import json
import os
from typing import Any

import torch

CONFIG_ENV = "VISLANG_SERVE_CONFIG"  # create_app's arguments (JSON) for the processes uvicorn starts
FACTORY = "vislang.serve.workers:app_from_env"  # what those processes import: uvicorn needs an import string


def default_threads(workers: int, cpus: int | None = None) -> int:
    """Compute threads per server process: half the cores spread over the workers (the other half answers HTTP), at
    least 1. On 2 cores that is 1 thread, with 1 worker or 2."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // (2 * max(1, workers)))


def set_threads(n: int) -> None:
    """Use ``n`` compute threads in this process: torch's pool and FAISS's (with the BLAS it calls)."""
    torch.set_num_threads(n)
    try:
        import faiss  # lazy: the index back end may be pgvector, without faiss installed
    except ModuleNotFoundError:
        return
    faiss.omp_set_num_threads(n)


def freeze_startup_objects() -> None:
    """Take everything loaded at start (model, library, web framework: ~230k objects) out of the garbage
    collector's full collections.

    Why: a full collection scans every tracked object with the GIL held (170-470 ms on the shared 2-core machine
    under load) and runs whenever enough objects have survived since the last one, under load every few seconds;
    every request in flight waits that long. Those objects live as long as the server does, so scanning them finds
    nothing."""
    gc.collect()
    gc.freeze()


def app_from_env():
    """The app of one worker process: ``create_app(**config)`` with the config ``serve`` put in
    ``$VISLANG_SERVE_CONFIG`` (uvicorn calls this in each process it starts: ``factory=True``)."""
    from .app import create_app  # lazy: the supervisor process imports this module without loading the models

    config = json.loads(os.environ[CONFIG_ENV])
    set_threads(config.pop("threads"))
    app = create_app(**config)
    freeze_startup_objects()
    return app


def serve(app_config: dict[str, Any], workers: int, threads: int | None, **uvicorn_options: Any) -> None:
    """Run the app in ``workers`` processes (1: in this one) with ``threads`` compute threads each (default
    ``default_threads``); ``uvicorn_options`` go to ``uvicorn.run``."""
    import uvicorn  # lazy: the serve extra is optional

    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    threads = threads or default_threads(workers)
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    if workers == 1:
        from .app import create_app  # lazy: as in app_from_env

        set_threads(threads)
        app = create_app(**app_config)
        freeze_startup_objects()
        uvicorn.run(app, **uvicorn_options)
        return
    check_config(app_config)
    os.environ[CONFIG_ENV] = json.dumps({**app_config, "threads": threads}, default=str)  # paths as text
    uvicorn.run(FACTORY, factory=True, workers=workers, **uvicorn_options)


def check_config(app_config: dict[str, Any]) -> None:
    """Open the index and load its model here, once, before any worker starts, then let them go.

    Why: uvicorn restarts a worker that dies, so a worker that cannot start (a mistyped --index, a model of another
    embedding size) would be restarted for ever, printing the same traceback; checked here, the command stops at once
    with the library's message, as it does with one worker."""
    from ..index.search import Searcher  # lazy: as in app_from_env

    searcher = Searcher(app_config["index_dir"], app_config.get("model_dir"), app_config.get("device", "cpu"),
                        read_only=True)  # fmt: skip
    try:
        searcher.model  # noqa: B018 -- loads it: a wrong directory or embedding size raises here
    finally:
        searcher.close()
    for option in ("caption_model", "vqa_model", "generate_model", "read_model"):
        folder = app_config.get(option)
        if folder is not None and not os.path.isdir(folder):
            flag = "--" + option.replace("_", "-")
            raise FileNotFoundError(f"{flag} {folder} is not a directory; pass the folder the model was saved in")
