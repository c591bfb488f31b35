"""Image classification on top of a pretrained image tower: ``vislang finetune`` (probe, full fine-tune, scratch)."""

from ..data.labelled import LabelledImages, NoLabelsError, load_labelled
from .run import METHODS, FinetuneConfig, finetune, run_method

__all__ = ["METHODS", "FinetuneConfig", "LabelledImages", "NoLabelsError", "finetune", "load_labelled", "run_method"]
