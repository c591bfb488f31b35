import pytest

from vislang.config import ConfigError, apply_overrides, from_dict, to_dict
from vislang.train.config import TrainConfig, load_train_config


def test_overrides_and_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model_name: fmnist-cnn\nepochs: 2\noptim: {lr: 0.01}\n")
    cfg = load_train_config(p, ["optim.lr=1e-4", "model.vision.width=48", "data.max_train=100", "progress=false"])
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.epochs == 2.0
    assert cfg.model == {"vision": {"width": 48}} and cfg.data.max_train == 100 and cfg.progress is False
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="optim.lrr|lrr"):
        load_train_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="no '='"):
        apply_overrides({}, ["optim.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config("/nonexistent.yaml")
