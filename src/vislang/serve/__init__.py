"""The HTTP service (FastAPI): ``create_app(index_dir, model_dir)``; ``vislang serve`` runs it with uvicorn."""


def create_app(*args, **kwargs):
    """See :func:`vislang.serve.app.create_app` (imported on use: FastAPI is an optional dependency)."""
    from .app import create_app as _create_app  # lazy: fastapi (the serve extra) loads only when the app is made

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
