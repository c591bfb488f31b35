"""Evaluation of dual encoders: zero-shot classification, image↔text retrieval, linear probes, and their figures.

Every function takes a model with ``encode_image``/``encode_text``, a tokenizer callable and either a prepared
dataset (``get_batch``, ``labels``, ``classnames``, ``captions``) or plain tensors, and returns plain dicts of numbers.
``report.evaluate_run`` runs them all and writes ``results.json`` and PNGs; ``report.write_report`` turns a run
directory into one HTML page. GAN metrics (FID-FM, KID, IS, CLIP score) live in ``gan_metrics`` and ``gan``.
"""

from .embed import embed_images, embed_images_and_features, embed_texts, tower_features
from .linear_probe import linear_probe, probe_eval
from .retrieval import chance_hit_rate, chance_recall, dedupe_captions, retrieval_eval, retrieval_metrics
from .zero_shot import (
    DEFAULT_TEMPLATES,
    classification_metrics,
    zero_shot_classifier,
    zero_shot_eval,
    zero_shot_predict,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "chance_hit_rate",
    "chance_recall",
    "classification_metrics",
    "dedupe_captions",
    "embed_images",
    "embed_images_and_features",
    "embed_texts",
    "linear_probe",
    "probe_eval",
    "retrieval_eval",
    "retrieval_metrics",
    "tower_features",
    "zero_shot_classifier",
    "zero_shot_eval",
    "zero_shot_predict",
]
