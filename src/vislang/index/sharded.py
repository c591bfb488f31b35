"""``index build`` across processes and machines: ``torchrun ... -m vislang.cli index build SRC --backend pgvector``.

Each process (rank) reads the source in the same order and embeds every ``world``-th item starting at its rank, so
the shares are disjoint and together cover the source; all of them write into one PostgreSQL/pgvector table, whose
id sequence and ``UNIQUE`` key make concurrent inserts safe. Rank 0 creates the index before the others open it, and
builds the deferred HNSW graph once everyone is done. A killed sharded build resumes like a single one (each rank
skips the keys already committed), with the same or another number of processes.

Every process must see the index directory (one machine, or a shared folder) and reach the database
(``VISLANG_PG_URI``; an embedded pgserver would be one per process, so it is refused here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from .. import distributed as dist
from .build import SourceItem, add_items, load_embedder, open_or_create, open_source
from .pgvector_index import URI_ENV


def world_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: Iterator[SourceItem], rank: int, world: int) -> Iterator[SourceItem]:
    """Every ``world``-th item from position ``rank``: disjoint shares that together are the whole source."""
    for i, it in enumerate(items):
        if i % world == rank:
            yield it


def build_index_sharded(
    src: str,
    index_dir: str | os.PathLike,
    model_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    commit_every: int = 8,
    device: str = "cpu",
    progress: bool = True,
    img_key: str | None = None,
    caption_key: str | None = None,
    backend: str = "pgvector",
    precision: str = "auto",
    **options: Any,
) -> dict[str, Any]:
    """``build_index`` run by every torchrun process on its share; returns the counts summed over all processes,
    plus ``per_rank`` (images each process embedded)."""
    if backend != "pgvector" or not (options.get("uri") or os.environ.get(URI_ENV)):
        raise ValueError(
            f"a build across processes writes into one shared index: pass --backend pgvector and set {URI_ENV}="
            "postgresql://... to a database every process can reach"
        )
    rank, world, _ = dist.init_distributed("gloo")
    opts = {k: v for k, v in options.items() if k in ("uri", "table", "ef_search", "hnsw")}
    if rank == 0:
        index, model_path = open_or_create(index_dir, model_dir, backend, **opts)  # creates the table and header
    dist.barrier()
    if rank != 0:
        index, model_path = open_or_create(index_dir, model_dir, backend, **opts)
    counts: dict[str, Any] = {"added": 0, "already": 0, "duplicates": 0, "unreadable": 0}
    try:
        model, preprocess = load_embedder(model_path, device)
        if rank == 0:
            index.set_state("build", {"source": src, "status": "running", "processes": world})
        t0 = time.perf_counter()
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm  # lazy: only a progress bar needs it

            bar = tqdm(desc=f"indexing (rank 0 of {world})", unit="img")
        add_items(index, shard(open_source(src, img_key, caption_key), rank, world), model, preprocess, device,
                  batch_size, commit_every, counts, bar, precision=precision)  # fmt: skip
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
    finally:
        index.close()
    dist.barrier()
    return counts
