"""vislang: train, evaluate and serve vision-language models on your own images and texts, offline.

The public API follows OpenCLIP's names::

    model, preprocess_train, preprocess = vislang.create_model_and_transforms("runs/demo/model")
    tokenizer = vislang.get_tokenizer("runs/demo/model")
    image_emb = model.encode_image(preprocess(img).unsqueeze(0))
    text_emb = model.encode_text(tokenizer(["a photo of a sneaker"]))
"""

from .factory import (
    __version__,
    create_model,
    create_model_and_transforms,
    from_pretrained,
    get_model_config,
    get_tokenizer,
    list_models,
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
    "save_pretrained",
]
