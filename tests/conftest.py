import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Precision trials and peak probes of test runs stay out of the user's cache, and precision: auto is fp32 so that
# outputs do not depend on a timing trial (tests/test_precision.py unsets it to test auto itself).
os.environ.setdefault("VISLANG_PRECISION", "fp32")
os.environ.setdefault("VISLANG_PRECISION_CACHE", os.path.join(tempfile.mkdtemp(), "precision.json"))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from vislang.data.fashion_mnist import DEFAULT_ROOT, SPLIT_FILES  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tests that read the real Fashion-MNIST (the Debian package) carry @pytest.mark.fashion_mnist: on a machine without
# it they are skipped with the command that installs it, instead of failing deep inside a GAN or training run.
# `make test` installs it first (its fashion-mnist prerequisite), so CI runs them.
FASHION_MNIST_FILES = [Path(DEFAULT_ROOT, name) for files in SPLIT_FILES.values() for name in files]
FASHION_MNIST_SKIP = (
    f"Fashion-MNIST is not installed ({DEFAULT_ROOT}); install it with `sudo apt-get install dataset-fashion-mnist` "
    "(or `make fashion-mnist` as root; `make test` does this)"
)


def have_fashion_mnist() -> bool:
    """All four files of the Debian package ``dataset-fashion-mnist`` are where vislang reads them by default."""
    return all(p.is_file() for p in FASHION_MNIST_FILES)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fashion_mnist: reads the real Fashion-MNIST; skipped (with the fix) without it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if have_fashion_mnist():
        return
    skip = pytest.mark.skip(reason=FASHION_MNIST_SKIP)
    for item in items:
        if item.get_closest_marker("fashion_mnist"):
            item.add_marker(skip)


@pytest.fixture
def tiny_model_cfg():
    from vislang.models import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextConfig(arch="transformer", vocab_size=64, context_length=12, width=16, layers=1, heads=2),
    )
