"""explain: the Grad-CAM peak lies on the object a (hand-built) dual encoder's text names, and a PNG is written."""

import numpy as np
import pytest
import torch
from PIL import Image

from vislang.cli.main import main
from vislang.data.shapes import Scene, SceneObject, render
from vislang.factory import save_pretrained
from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
from vislang.tokenizers import Tokenizer


def _red_detector(tmp_path):
    """A CLIP whose image tower maps pixels to (redness, 1) and whose texts all embed as "redness"."""
    tok = Tokenizer.train(["a red circle", "a blue square"], vocab_size=40, context_length=8)
    cfg = ModelConfig(
        embed_dim=2,
        vision=VisionConfig(arch="cnn", image_size=32, channels=3, width=4, depth=1, mean=(0.5,) * 3, std=(0.25,) * 3),
        text=TextConfig(vocab_size=tok.vocab_size, pad_id=tok.pad_id, context_length=8, width=8, layers=1, heads=2),
    )
    model = CLIP(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        conv1, bn1 = model.visual.stages[0][0][0], model.visual.stages[0][0][1]
        conv1.weight[0, :, 1, 1] = torch.tensor([1.0, -0.5, -0.5])  # redness: R - (G + B) / 2
        bn1.weight[0], bn1.bias[1] = 1.0, 1.0  # channel 1: the constant 1
        conv2, bn2 = model.visual.stages[0][1][0], model.visual.stages[0][1][1]
        conv2.weight[:, :, 1, 1] = torch.eye(4)
        bn2.weight.fill_(1.0)
        model.image_proj.weight[0, 0] = model.image_proj.weight[1, 1] = 1.0
        model.text.ln_final.bias[0] = 1.0
        model.text_proj.weight[0, 0] = 1.0
    save_pretrained(model, tmp_path / "m", tok)
    return tmp_path / "m"


def _scene():
    objects = (
        SceneObject("circle", "red", "small", x=8.0, y=22.0, r=4.0),
        SceneObject("square", "blue", "large", x=22.0, y=9.0, r=6.0),
    )
    return render(Scene(objects, 32, (225, 225, 225), noise_seed=3)), objects[0]


def test_grad_cam_peak_lies_on_the_named_object(tmp_path):
    from vislang.evaluation.explain import saliency

    model_dir = _red_detector(tmp_path)
    img, red = _scene()
    heat = saliency(model_dir, img, "a red circle")
    assert heat.shape == (32, 32) and heat.max() == pytest.approx(1.0)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert abs(x + 0.5 - red.x) <= red.r and abs(y + 0.5 - red.y) <= red.r
    assert heat[9, 22] < 0.1  # the blue square gets nothing


def test_cli_explain_writes_png(tmp_path, capsys):
    model_dir = _red_detector(tmp_path)
    img, _ = _scene()
    img.save(tmp_path / "scene.png")
    out = tmp_path / "x" / "heat.png"
    assert (
        main(["explain", str(tmp_path / "scene.png"), "a red circle", "--model", str(model_dir), "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (256, 256)
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert main(["explain", str(tmp_path / "bad.png"), "a red circle", "--model", str(model_dir)]) == 2
    assert "cannot read" in capsys.readouterr().err
