"""Captioning from the command line: ``vislang caption``, ``vislang caption-eval`` and ``vislang render-text``."""

from .commands import caption_files, evaluate_captions

__all__ = ["caption_files", "evaluate_captions"]
