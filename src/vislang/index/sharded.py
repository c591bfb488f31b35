"""``index build`` across processes and machines: ``torchrun ... -m vislang.cli index build SRC --backend pgvector``.

Each process (rank) reads the source in the same order and embeds every ``world``-th item starting at its rank, so
the shares are disjoint and together cover the source; all of them write into one PostgreSQL/pgvector table, whose
id sequence and ``UNIQUE`` key make concurrent inserts safe. Rank 0 creates the index before the others open it, and
builds the deferred HNSW graph once everyone is done. A killed sharded build resumes like a single one (each rank
skips the keys already committed), with the same or another number of processes. It takes ``build_index``'s
arguments and records the folders a server may send files from as ``build_index`` does (``--allow-outside-root``
included), each process adding its own before it commits.

Every process must see the index directory (one machine, or a shared folder) and reach the database
(``VISLANG_PG_URI``; an embedded pgserver would be one per process, so it is refused here).
"""

from __future__ import annotations

import inspect
import itertools
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from .. import distributed as dist
from .build import SourceItem, add_items, build_index, load_embedder, open_or_create, open_source, source_roots
from .files import ROOTS_STATE, track_roots
from .pgvector_index import URI_ENV
from .video import is_video_source


def world_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: Iterator[SourceItem], rank: int, world: int) -> Iterator[SourceItem]:
    """Every ``world``-th item from position ``rank``: disjoint shares that together are the whole source."""
    for i, it in enumerate(items):
        if i % world == rank:
            yield it


def build_index_sharded(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """``build_index`` run by every torchrun process on its share; returns the counts summed over all processes,
    plus ``per_rank`` (images each process embedded).

    Takes ``build_index``'s own arguments (bound to its signature here, so the two never drift apart) and honours
    them the same way: rank 0 records the source's folders before any process adds an item, and each process adds
    the folders of the outside paths it was allowed (``allow_outside_root``) before each commit, into one list the
    database unions (``add_to_state_list``), so a server may serve every committed item and no process's folders are
    lost."""
    bound = inspect.signature(build_index).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    src, index_dir, options = a["src"], a["index_dir"], a["options"]
    if a["backend"] != "pgvector" or not (options.get("uri") or os.environ.get(URI_ENV)):
        raise ValueError(
            f"a build across processes writes into one shared index: pass --backend pgvector and set {URI_ENV}="
            "postgresql://... to a database every process can reach"
        )
    if is_video_source(src):
        raise ValueError(f"{src} is video: index it with one process (without torchrun)")
    if a["batch_size"] < 1 or a["commit_every"] < 1:
        raise ValueError("batch_size and commit_every must be at least 1")
    items = open_source(src, a["img_key"], a["caption_key"], a["allow_outside_root"])
    first = next(items, None)  # errors about the source come before anything is created
    if first is None:
        raise ValueError(f"{src} holds no images to index")
    items = itertools.chain([first], items)
    rank, world, _ = dist.init_distributed("gloo")
    if rank == 0:
        index, model_path = open_or_create(index_dir, a["model_dir"], "pgvector", **options)  # table and header
        index.add_to_state_list(ROOTS_STATE, source_roots(src))  # before any process adds an item
    dist.barrier()
    if rank != 0:
        index, model_path = open_or_create(index_dir, a["model_dir"], "pgvector", **options)
    try:
        counts = embed_share(index, model_path, items, a, rank, world)
    finally:
        index.close()
    dist.barrier()
    return counts


def embed_share(index: Any, model_path: Any, items: Iterator[SourceItem], a: dict[str, Any], rank: int,
                world: int) -> dict[str, Any]:  # fmt: skip
    """This process's share embedded into the index (its outside folders recorded before each commit); the counts of
    every process summed, rank 0 marking the build complete once all have committed."""
    src, device = a["src"], a["device"]
    counts: dict[str, Any] = {"added": 0, "already": 0, "duplicates": 0, "unreadable": 0}
    model, preprocess = load_embedder(model_path, device)
    if model.cfg.embed_dim != index.dim:
        raise ValueError(f"the model embeds into {model.cfg.embed_dim} dims but {a['index_dir']} holds {index.dim}")
    if rank == 0:
        index.set_state("build", {"source": src, "status": "running", "processes": world})
    roots = set(index.get_state(ROOTS_STATE) or [])
    t0 = time.perf_counter()
    bar = None
    if a["progress"] and rank == 0:
        from tqdm.auto import tqdm  # lazy: only a progress bar needs it

        bar = tqdm(desc=f"indexing (rank 0 of {world})", unit="img")
    mine = track_roots(shard(items, rank, world), roots)  # adds the folders of allowed outside paths
    add_items(index, mine, model, preprocess, device, a["batch_size"], a["commit_every"], counts, bar,
              before_commit=lambda: index.add_to_state_list(ROOTS_STATE, roots), precision=a["precision"])  # fmt: skip
    if bar is not None:
        bar.close()
    mine = torch.tensor([counts[k] for k in ("added", "already", "duplicates", "unreadable")], dtype=torch.long)
    per_rank = [torch.zeros_like(mine) for _ in range(world)]
    torch.distributed.all_gather(per_rank, mine)
    total = torch.stack(per_rank).sum(0).tolist()
    counts = dict(zip(("added", "already", "duplicates", "unreadable"), total))
    counts["per_rank"] = [int(r[0]) for r in per_rank]
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    dist.barrier()  # every share committed
    if rank == 0:
        index.set_state("build", {"source": src, "status": "complete", "processes": world,
                                  **{k: v for k, v in counts.items() if k != "per_rank"}})  # fmt: skip
    elif hasattr(index, "_hnsw_pending"):
        index._hnsw_pending = False  # rank 0 builds the HNSW graph once, not every process at the same time
    counts["size"] = len(index)
    return counts
