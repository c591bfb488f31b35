"""Datasets, preprocessing and the prepared on-disk format.

Readers yield ``(PIL image, caption[, label])`` items; ``prepare`` decodes and tokenizes them once into memory-mapped
arrays that ``PreparedDataset`` serves to the trainer. Built-in sources: Fashion-MNIST and OpenClipart (Debian
packages) and a synthetic shapes world with captions and questions.
"""

from .fashion_mnist import CAPTION_TEMPLATES, FASHION_MNIST_CLASSES, ZERO_SHOT_TEMPLATES, FashionMNIST
from .openclipart import OpenClipart
from .prepare import PreparedDataset, PreparedInfo, is_prepared, prepare, prepared_dir_for
from .readers import (
    CocoCaptions,
    CsvDataset,
    DatasetMissingError,
    FolderDataset,
    JsonlDataset,
    SkipCounter,
    WebDatasetShards,
    drop_none,
)
from .shapes import ShapesConfig, ShapesDataset, generate_scene, render, single_object_caption
from .sources import open_dataset
from .transforms import ImageTransform, normalize, pil_to_array

__all__ = [
    "CAPTION_TEMPLATES",
    "FASHION_MNIST_CLASSES",
    "ZERO_SHOT_TEMPLATES",
    "CocoCaptions",
    "CsvDataset",
    "DatasetMissingError",
    "FashionMNIST",
    "FolderDataset",
    "ImageTransform",
    "JsonlDataset",
    "OpenClipart",
    "PreparedDataset",
    "PreparedInfo",
    "ShapesConfig",
    "ShapesDataset",
    "SkipCounter",
    "WebDatasetShards",
    "drop_none",
    "generate_scene",
    "is_prepared",
    "normalize",
    "open_dataset",
    "pil_to_array",
    "prepare",
    "prepared_dir_for",
    "render",
    "single_object_caption",
]
