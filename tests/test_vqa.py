"""VQA: scoring against hand-computed cases, data readers, save/load, a tiny training run, and clear input errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vislang.cli.main import main
from vislang.data.vqa import answer_targets, answer_vocab, read_vqa_file, shapes_vqa
from vislang.evaluation.vqa_metrics import vqa_accuracy, vqa_score
from vislang.models.vqa import load_vqa
from vislang.models.vqa_generative import answer_probability, predict_answer
from vislang.train.config import VQATrainConfig
from vislang.train.tasks.vqa import train_vqa

TINY = (
    "vision.width=4",
    "vision.depth=2",
    "vision.image_size=24",
    "text.width=16",
    "text.layers=1",
    "text.heads=2",
    "text.vocab_size=120",
    "fusion.dim=16",
    "fusion.heads=2",
    "fusion.depth=1",
    "head_hidden=16",
)


def test_vqa_score_hand_computed():
    assert vqa_score("red", ["red"]) == 1.0
    assert vqa_score("Red.", [" red "]) == 1.0  # normalised
    assert vqa_score("blue", ["red"]) == 0.0
    many = ["red", "red", "blue", "red", "green"]
    assert vqa_score("red", many) == 1.0  # 3 matches -> min(3/3, 1)
    assert vqa_score("blue", many) == pytest.approx(1 / 3)
    assert vqa_score("green", ["green", "green", "x", "y"]) == pytest.approx(2 / 3)
    assert vqa_score("pink", many) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_score("red", [])


def test_accuracy_per_type():
    acc = vqa_accuracy(["red", "two", "yes"], [["red"], ["three"], ["yes", "yes", "no"]], ["colour", "count", "yes/no"])
    assert acc["per_type"] == {"colour": 1.0, "count": 0.0, "yes/no": pytest.approx(2 / 3)}
    assert acc["overall"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert acc["n"] == 3


def test_answer_targets_are_vqa_scores():
    vocab = answer_vocab([["a", "a", "b"], ["c"]])
    assert vocab[0] == "a"
    t = answer_targets([["a", "a", "b"], ["c"]], vocab)
    assert t[0, vocab.index("a")] == pytest.approx(2 / 3) and t[0, vocab.index("b")] == pytest.approx(1 / 3)
    assert t[1, vocab.index("c")] == 1.0


def test_shapes_vqa_points_questions_at_images():
    s = shapes_vqa("train", n=5, image_size=32)
    assert s.images.shape == (5, 32, 32, 3) and s.images.dtype == np.uint8
    assert len(s.questions) == len(s.answers) == len(s.types) == len(s.image_index) > 5
    assert set(s.image_index.tolist()) == set(range(5))
    assert {"colour", "count", "yes/no"} <= set(s.types)


def _write_rows(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [
        {"image": "a.png", "question": "what colour?", "answer": "red", "type": "colour"},
        {"image": "a.png", "question": "is it red?", "answers": ["yes", "yes", "no"]},
        {"image": "a.png", "question": "", "answer": "red"},  # empty question
        {"image": "a.png", "question": "what colour?"},  # no answer
        {"image": "bad.png", "question": "what?", "answer": "x"},  # unreadable
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken json\n")
    return path


def test_jsonl_rows_missing_fields_are_skipped_and_counted(tmp_path):
    s = read_vqa_file(_write_rows(tmp_path), image_size=16)
    assert s.questions == ["what colour?", "is it red?"]
    assert s.answers[1] == ["yes", "yes", "no"]
    assert s.images.shape == (1, 16, 16, 3)
    assert s.skips.counts == {"row with a missing field": 3, "unreadable image": 1}


def test_csv_several_answers(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "q.csv").write_text("image,question,answer\nb.png,how many?,two|two|three\nb.png,,x\n")
    s = read_vqa_file(tmp_path / "q.csv", image_size=8)
    assert s.answers == [["two", "two", "three"]] and s.skips.total == 1


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    cfg = VQATrainConfig(overrides=TINY, n_train=48, n_test=16, epochs=1, batch_images=16, out_dir=str(out))
    results = train_vqa(cfg, progress=False)
    return out / "model", results


def test_tiny_training_saves_a_loadable_model(tiny_model, tmp_path):
    model_dir, results = tiny_model
    assert {"test", "holdout"} <= set(results) and 0 <= results["test"]["overall"] <= 1
    model, tok, answers = load_vqa(model_dir)
    assert model.cfg.num_answers == len(answers) == results["answers"]
    img = Image.fromarray(shapes_vqa("test", n=1, image_size=24).images[0])
    img.save(tmp_path / "s.png")
    ((ans, p),) = predict_answer(model_dir, tmp_path / "s.png", "what colour is the circle?")
    assert ans in answers and 0 < p <= 1
    x = torch.zeros(1, 3, 24, 24)
    again, _, _ = load_vqa(model_dir)
    torch.testing.assert_close(
        model(x, tok(["is there a red circle?"]))["logits"], again(x, tok(["is there a red circle?"]))["logits"]
    )


def test_cli_vqa_and_bad_inputs(tiny_model, tmp_path, capsys):
    model_dir, _ = tiny_model
    Image.new("RGB", (24, 24), (255, 255, 255)).save(tmp_path / "w.png")
    assert main(["vqa", str(tmp_path / "w.png"), "how many objects are there?", "--model", str(model_dir)]) == 0
    line = capsys.readouterr().out.strip().split("\t")
    assert len(line) == 2 and 0 < float(line[1]) <= 1

    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        predict_answer(model_dir, tmp_path / "broken.png", "what colour is the circle?")
    with pytest.raises(ValueError, match="question is empty"):
        predict_answer(model_dir, tmp_path / "w.png", "   ")
    with pytest.raises(ValueError, match="shorter question"):
        predict_answer(model_dir, tmp_path / "w.png", "what colour is the circle " * 10)
    with pytest.raises(ValueError, match="never appeared in training"):
        answer_probability(model_dir, tmp_path / "w.png", "what colour is the circle?", "magenta")
    assert main(["vqa", str(tmp_path / "broken.png"), "what?", "--model", str(model_dir)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_vislang_train_routes_a_vqa_config(tmp_path, capsys):
    cfg = tmp_path / "vqa.yaml"
    cfg.write_text(
        "task: vqa\nn_train: 32\nn_test: 8\nepochs: 1\nbatch_images: 16\n"
        f"out_dir: {tmp_path / 'run'}\noverrides: {json.dumps(list(TINY))}\n"
    )
    gated = json.dumps([*TINY, "fusion.kind=gated"])
    assert main(["train", "--config", str(cfg), f"--overrides={gated}"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "held-out colour-shape pairs" not in out
    model, _, _ = load_vqa(tmp_path / "run" / "model")
    assert model.cfg.fusion.kind == "gated"  # the command-line override reached the model
    assert main(["train", "--config", str(cfg), f"--overrides={gated}", "--resume"]) == 0  # finished: nothing to redo
    assert main(["train", "--config", str(cfg), "--resume"]) == 2  # another fusion than the checkpoint's
    assert "resume with the run's own config" in capsys.readouterr().err
    cfg.write_text("task: vqa\nn_train: 32\nbogus_field: 1\n")
    assert main(["train", "--config", str(cfg)]) != 0
    assert "unknown key(s) ['bogus_field']" in capsys.readouterr().err
