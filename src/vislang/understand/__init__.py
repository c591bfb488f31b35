"""Multimodal understanding: VQA and image–text matching on fused models, saliency maps, fine-tuning.

The library parts live in ``vislang.models.fusion``/``vqa``/``itm``, ``vislang.data.vqa`` and
``vislang.evaluation.vqa_metrics``; this package holds the small training loops and the CLI commands built on them.
"""

from .vqa_generative import VQAGenConfig
from .vqa_train import VQATrainConfig, evaluate_vqa, load_vqa_config, predict_answer

__all__ = [
    "VQAGenConfig",
    "VQATrainConfig",
    "evaluate_vqa",
    "load_vqa_config",
    "predict_answer",
]
