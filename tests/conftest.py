import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_model_cfg():
    from vislang.models import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextConfig(arch="transformer", vocab_size=64, context_length=12, width=16, layers=1, heads=2),
    )
