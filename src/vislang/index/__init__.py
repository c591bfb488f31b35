"""Embedding indexes: FAISS + SQLite embedded in a directory, or PostgreSQL with pgvector, behind one interface.

    from vislang.index import build_index, Searcher
    build_index("photos/", "photos.index", model_dir="runs/demo/model")
    hits = Searcher("photos.index").search_text("a red shoe", k=5)   # [{"id", "score", "path", "caption"}, ...]

Names are imported on first use, so ``vislang --help`` (which imports ``vislang.index.commands``) stays fast.
"""

import importlib

_EXPORTS = {
    "Index": ".base",
    "create_index": ".base",
    "open_index": ".base",
    "build_index": ".build",
    "remove_from_index": ".build",
    "Searcher": ".search",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
