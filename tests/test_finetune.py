"""`vislang finetune`: probe / full / scratch on a tiny class-folder dataset, the probe's folded head, bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vislang
from vislang.data.labelled import LabelledImages, NoLabelsError, load_labelled
from vislang.models.classifier import ClassifierConfig, ImageClassifier
from vislang.train.finetune import FinetuneConfig, Splits, finetune, fit_probe_head, run_method
from vislang.train.tasks.finetune import augment

LEVELS = {"bright": 220, "dark": 30, "mid": 125}


def _write_images(folder, n_per_class=24, size=16, seed=0):
    rng = np.random.default_rng(seed)
    for name, level in LEVELS.items():
        (folder / name).mkdir(parents=True)
        for i in range(n_per_class):
            px = np.clip(level + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(folder / name / f"{i}.png")


@pytest.fixture
def setup(tmp_path, tiny_model_cfg):
    torch.manual_seed(0)
    vislang.create_model(tiny_model_cfg).save_pretrained(tmp_path / "clip")
    _write_images(tmp_path / "data")
    cfg = FinetuneConfig(
        model=str(tmp_path / "clip"),
        data=str(tmp_path / "data"),
        epochs=2,
        batch_size=16,
        warmup_steps=2,
        threads=1,
        device="cpu",
        out_dir=str(tmp_path / "out"),
        progress=False,
    )
    return tmp_path, cfg


def test_probe_full_scratch_end_to_end(setup):
    tmp_path, cfg = setup
    results = {r["method"]: r for r in finetune(cfg, ["probe", "full", "scratch"])}
    table = (tmp_path / "out" / "results.md").read_text()
    assert all(f"| {m} |" in table for m in ("probe", "full", "scratch"))
    source = vislang.from_pretrained(tmp_path / "clip").visual.state_dict()
    for method in ("probe", "full", "scratch"):
        model = vislang.from_pretrained(tmp_path / "out" / method / "model")
        assert isinstance(model, ImageClassifier) and model.class_names == ["bright", "dark", "mid"]
        metrics = json.loads((tmp_path / "out" / method / "metrics.json").read_text())
        assert metrics["test_top1"] == results[method]["test_top1"] and set(metrics["per_class"]) == set(LEVELS)
        assert metrics["n_test"] == 15 and metrics["n_train"] + metrics["n_val"] == 57  # 20% test, then 10% val
        same = all(torch.equal(source[k], v) for k, v in model.visual.state_dict().items())
        assert same == (method == "probe")  # the probe never touches the tower; the others train it
    assert results["probe"]["trainable_params"] == 3 * (model.visual.width + 1)
    assert results["full"]["trainable_params"] == results["scratch"]["trainable_params"] > 3 * model.visual.width
    assert results["probe"]["test_top1"] >= 0.8  # brightness classes are linearly separable in any CNN's features
    assert "C" in results["full"]["probe"]  # LP-FT: full starts from the probe's head

    # full from a classifier directory continues from its head instead of fitting a probe again
    again = run_method("full", dataclasses.replace(cfg, model=str(tmp_path / "out" / "probe" / "model")))
    assert again["probe"] == {"from": str(tmp_path / "out" / "probe" / "model"), "fit_s": 0.0}


def test_probe_head_matches_sklearn(setup):
    """The probe folded into a linear layer gives the same logits as the fitted sklearn pipeline."""
    from vislang.evaluation.linear_probe import fit_probe
    from vislang.train.finetune import tower_features

    _, cfg = setup
    rng = np.random.default_rng(0)
    v = vislang.from_pretrained(cfg.model).cfg.vision

    def part(n):
        labels = rng.integers(0, 3, n)
        images = np.clip(np.array([40, 120, 200])[labels, None, None, None] + rng.normal(0, 60, (n, 16, 16, 3)), 0, 255)
        return LabelledImages(images.astype(np.uint8), labels.astype(np.int64), ["a", "b", "c"])

    splits = Splits(part(60), part(30), part(30), "test")
    model = ImageClassifier(ClassifierConfig(vision=v, class_names=("a", "b", "c")))
    model.lock_tower()
    info = fit_probe_head(model, splits, dataclasses.replace(cfg, probe_cs=(0.1, 1.0)), torch.device("cpu"))
    feats = tower_features(model, splits.test, 64, torch.device("cpu"))
    ref, _ = fit_probe(tower_features(model, splits.train, 64, torch.device("cpu")), splits.train.labels, info["C"])
    x = model.preprocess(torch.from_numpy(splits.test.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_allclose(logits, ref.decision_function(feats), rtol=1e-4, atol=1e-4)


def test_augment_shifts_and_flips_within_bounds():
    x = torch.arange(2 * 1 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    pad = 2
    xp = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    for b in range(2):
        crops = [xp[b, :, i : i + 28, j : j + 28] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)


def test_csv_dataset_with_labels(tmp_path):
    _write_images(tmp_path / "imgs", n_per_class=2)
    rows = [f"imgs/{name}/{i}.png,{j + 1}" for j, name in enumerate(sorted(LEVELS)) for i in range(2)]
    (tmp_path / "d.csv").write_text("filepath,label\n" + "\n".join(rows) + "\n")
    data = load_labelled(str(tmp_path / "d.csv"), "train", 8, 1)
    assert data.images.shape == (6, 8, 8, 1) and data.class_names == ["1", "2", "3"]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]


# --- bad input --------------------------------------------------------------------------------------------------------
def test_unknown_method(setup):
    _, cfg = setup
    with pytest.raises(ValueError, match="unknown method.*choose from probe, full, scratch"):
        finetune(cfg, ["probe", "lora"])


def test_model_dir_that_is_not_a_model(setup):
    tmp_path, cfg = setup
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a vislang model directory"):
        finetune(dataclasses.replace(cfg, model=str(tmp_path / "empty")), ["probe"])


def test_named_config_without_weights_cannot_be_probed(setup):
    _, cfg = setup
    with pytest.raises(ValueError, match="without pretrained weights.*--method scratch"):
        finetune(dataclasses.replace(cfg, model="fmnist-cnn"), ["probe"])


def test_dataset_without_labels(setup):
    tmp_path, cfg = setup
    loose = tmp_path / "captioned"
    loose.mkdir()
    Image.new("RGB", (16, 16)).save(loose / "a.png")
    (loose / "a.txt").write_text("a black square")
    with pytest.raises(NoLabelsError, match="sub-folder named after its class"):
        finetune(dataclasses.replace(cfg, data=str(loose)), ["probe"])
    (tmp_path / "nolabel.csv").write_text("filepath,caption\ncaptioned/a.png,a black square\n")
    with pytest.raises(NoLabelsError, match="no label column 'label'.*--label-key"):
        finetune(dataclasses.replace(cfg, data=str(tmp_path / "nolabel.csv")), ["probe"])


def test_single_class_and_bad_fraction(setup, tmp_path):
    _, cfg = setup
    with pytest.raises(ValueError, match="held-out fraction must be between 0 and 1"):
        finetune(dataclasses.replace(cfg, val_fraction=1.5), ["probe"])
    _write_images(tmp_path / "three", n_per_class=2)
    one = tmp_path / "one"
    one.mkdir()
    (tmp_path / "three" / "dark").rename(one / "dark")
    with pytest.raises(ValueError, match="needs two or more classes"):
        finetune(dataclasses.replace(cfg, data=str(one)), ["probe"])


def test_cli_reports_errors_without_traceback(setup, capsys):
    from vislang.cli.main import main

    tmp_path, cfg = setup
    code = main(["finetune", "--model", cfg.model, "--data", cfg.data, "--method", "nope", "--out", cfg.out_dir])
    assert code == 2 and "unknown method" in capsys.readouterr().err


def test_cli_reads_a_config_file_then_flags_then_dotted_overrides(setup):
    """`vislang finetune --config`: the file's fields, a flag over the file (--epochs), a dotted override
    (--warmup_steps=1) over both; metrics.json records the config the method ran with."""
    import yaml

    from vislang.cli import main

    tmp_path, cfg = setup
    file = {**dataclasses.asdict(cfg), "epochs": 3.0, "warmup_steps": 5, "probe_cs": [1.0]}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(file))
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml"), "--method", "scratch", "--epochs", "1",
                 "--warmup_steps=1"]) == 0  # fmt: skip
    ran = json.loads((tmp_path / "out" / "scratch" / "metrics.json").read_text())["config"]
    assert (ran["epochs"], ran["warmup_steps"], ran["batch_size"], ran["data"]) == (1.0, 1, 16, cfg.data)
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml"), "--bogus_key=1"]) == 2
