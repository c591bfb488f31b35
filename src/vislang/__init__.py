"""vislang: train, evaluate and serve vision-language models on your own images and texts, offline.

The public API follows OpenCLIP's names::

    model, preprocess_train, preprocess = vislang.create_model_and_transforms("runs/demo/model")
    tokenizer = vislang.get_tokenizer("runs/demo/model")
    image_emb = model.encode_image(preprocess(img).unsqueeze(0))
    text_emb = model.encode_text(tokenizer(["a photo of a sneaker"]))

``vislang.load(dir)`` loads any saved model (dual encoder, captioner, ITM, classifier, VQA, GAN; fp32, int8 or an
ONNX export) by the ``model_type`` in its config.json (``vislang.registry.FAMILIES``).
"""

from .factory import (
    __version__,
    create_model,
    create_model_and_transforms,
    from_pretrained,
    get_model_config,
    get_tokenizer,
    list_models,
    load,
    save_pretrained,
)
from .models import CLIP, ModelConfig, TextConfig, VisionConfig

__all__ = [
    "CLIP",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "__version__",
    "create_model",
    "create_model_and_transforms",
    "from_pretrained",
    "get_model_config",
    "get_tokenizer",
    "list_models",
    "load",
    "save_pretrained",
]
