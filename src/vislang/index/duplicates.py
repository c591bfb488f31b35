"""Exact and near-duplicate images in an index: the groups ``vislang index duplicates`` reports.

Every photo archive holds copies: the same file twice, and the same picture resized, cropped, re-compressed or
colour-corrected. Two passes find them:

* **exact**: items whose image bytes hash alike (SHA-256 of the file, or of the tar member);
* **near**: items whose stored embeddings have cosine similarity of at least ``threshold``. Each item's ``k`` nearest
  neighbours come from the index's own search (exact or approximate, as the index was built), so the pass costs N
  searches rather than N² comparisons; pairs above the threshold are joined into groups (union-find), so a chain
  of edits of one picture forms one group.

A near group that holds only exact copies is reported once, as exact.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Index, open_index
from .build import read_item_bytes

DEFAULT_THRESHOLD = 0.9


@dataclass
class Group:
    """Items found to be copies of one another, with the lowest similarity that joined them."""

    kind: str  # "exact" or "near"
    ids: list[int]
    min_score: float = 1.0
    items: list[dict[str, Any]] = field(default_factory=list)


class UnionFind:
    """Disjoint sets of ids, joined pairwise."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]  # path halving
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = defaultdict(list)
        for a in list(self.parent):
            out[self.find(a)].append(a)
        return [sorted(g) for g in out.values() if len(g) > 1]


def index_ids(index: Index) -> np.ndarray:
    """Every id of an index, ascending (both back ends answer ``all_ids``)."""
    return np.asarray(index.all_ids(), dtype=np.int64)


def batches(ids: np.ndarray, n: int) -> Iterator[np.ndarray]:
    for start in range(0, len(ids), n):
        yield ids[start : start + n]


def exact_groups(index: Index, ids: np.ndarray, batch: int = 512) -> list[list[int]]:
    """Groups of ids whose image bytes are identical (unreadable files are left out)."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for part in batches(ids, batch):
        for meta in index.get(part.tolist()):
            if meta is None:
                continue
            try:
                data = read_item_bytes(meta["path"], meta.get("offset"), meta.get("size"))
            except OSError:
                continue
            by_hash[hashlib.sha256(data).hexdigest()].append(int(meta["id"]))
    return [sorted(g) for g in by_hash.values() if len(g) > 1]


def near_pairs(index: Index, ids: np.ndarray, threshold: float, k: int, batch: int = 256) -> Iterable[tuple]:
    """(id, id, cosine) for each item and each of its ``k`` nearest neighbours at or above ``threshold``."""
    for part in batches(ids, batch):
        scores, hits = index.search(index.vectors(part.tolist()), k + 1)  # +1: an item finds itself first
        for a, row_s, row_i in zip(part.tolist(), scores, hits):
            for s, b in zip(row_s.tolist(), row_i.tolist()):
                if b >= 0 and b != a and s >= threshold:
                    yield a, b, s


def find_duplicates(
    index: Index, threshold: float = DEFAULT_THRESHOLD, k: int = 10, exact: bool = True, near: bool = True
) -> list[Group]:
    """Exact and near-duplicate groups of an open index, largest first.

    Args:
        index: an open index.
        threshold: cosine similarity at or above which two images count as near-duplicates.
        k: neighbours looked at per item (a group larger than k+1 is still found through its chains).
        exact: hash the image bytes for exact copies.
        near: compare embeddings for near copies.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {threshold}")
    if k < 1:
        raise ValueError(f"-k must be at least 1, got {k}")
    ids = index_ids(index)
    out: list[Group] = []
    exact_sets: set[tuple[int, ...]] = set()
    if exact:
        for g in exact_groups(index, ids):
            out.append(Group("exact", g))
            exact_sets.add(tuple(g))
    if near and len(ids) > 1:
        uf, pairs = UnionFind(), []
        for a, b, s in near_pairs(index, ids, threshold, min(k, len(ids) - 1)):
            uf.union(a, b)
            pairs.append((a, s))
        low: dict[int, float] = {}
        for a, s in pairs:  # the weakest link of each group
            root = uf.find(a)
            low[root] = min(low.get(root, 1.0), s)
        for g in uf.groups():
            if tuple(g) not in exact_sets:
                out.append(Group("near", g, float(low.get(uf.find(g[0]), 1.0))))
    metas = {m["id"]: m for m in index.get(sorted({i for g in out for i in g.ids})) if m is not None}
    for g in out:
        g.items = [metas[i] for i in g.ids if i in metas]
    return sorted(out, key=lambda g: (-len(g.ids), g.kind, g.ids[0]))


def duplicates_report(
    index_dir: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD, k: int = 10, exact: bool = True
) -> dict[str, Any]:
    """``find_duplicates`` on the index in ``index_dir`` as a JSON-ready report (what the CLI prints or writes)."""
    with open_index(index_dir) as index:
        size = len(index)
        groups = find_duplicates(index, threshold, k, exact)
    return {
        "index": str(index_dir),
        "size": size,
        "threshold": threshold,
        "exact_groups": sum(g.kind == "exact" for g in groups),
        "near_groups": sum(g.kind == "near" for g in groups),
        "items_in_groups": sum(len(g.ids) for g in groups),
        "groups": [
            {"kind": g.kind, "min_score": round(g.min_score, 4), "items": [
                {"id": m["id"], "key": m["key"], "caption": m.get("caption", "")} for m in g.items
            ]}
            for g in groups
        ],
    }  # fmt: skip
