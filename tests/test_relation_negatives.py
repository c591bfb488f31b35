"""Relation-flipped hard negatives (``relation_negatives``): the caption function, the loss, and a training run."""

import json

import pytest
import torch

from _tiny import TINY
from vislang.data.shapes import flip_relation
from vislang.factory import build_model, build_tokenizer, get_model_config
from vislang.train import load_train_config, train
from vislang.train.tasks import ContrastiveTask, relation_negative_loss
from vislang.train.tasks.contrastive import relation_negative_tokens


def test_flip_relation_turns_the_first_relation_round():
    assert flip_relation("a red circle to the left of a blue square") == "a red circle to the right of a blue square"
    assert flip_relation("a small red star above a large blue star, plus a green circle") == (
        "a small red star below a large blue star, plus a green circle"
    )
    assert flip_relation("a red circle below a blue square") == "a red circle above a blue square"
    assert flip_relation("two objects: a red circle and a blue square") is None
    assert flip_relation("a photo of an aboveground pool") is None  # whole words only


def test_relation_negative_loss_prefers_the_true_caption():
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    other = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    scale = torch.tensor(20.0)
    good, acc_good = relation_negative_loss(img, img, other, scale)  # the caption matches the image exactly
    bad, acc_bad = relation_negative_loss(img, other, img, scale)  # the flipped caption does
    assert acc_good == 1.0 and acc_bad == 0.0
    assert good < 0.1 < bad


def _model_and_tokenizer(captions):
    over = {"vision": {"width": 4, "depth": 2, "image_size": 24}, "text": {"width": 16, "layers": 1, "heads": 2}}
    cfg = get_model_config("shapes-cnn", {**over, "embed_dim": 16})
    tok = build_tokenizer(cfg, captions)
    return build_model(cfg), tok


def test_task_adds_the_term_only_for_rows_with_a_negative():
    caps = ["a red circle to the left of a blue square", "a green star", "a blue square above a red star"]
    model, tok = _model_and_tokenizer(caps)
    batch = {"image": torch.randint(0, 255, (3, 3, 24, 24), dtype=torch.uint8), "tokens": tok(caps)}
    negs = torch.from_numpy(relation_negative_tokens(tok, caps, main=False)).long()
    assert (negs[1] == 0).all() and (negs[0] != 0).any()  # "a green star" has no relation: an all-zero row
    torch.manual_seed(0)
    plain, extra_plain = ContrastiveTask(model)(batch)
    with_neg, extra = ContrastiveTask(model, relation_negatives=1.0)({**batch, "neg_tokens": negs})
    assert "rel_acc" not in extra_plain and 0.0 <= extra["rel_acc"] <= 1.0
    assert with_neg.item() == pytest.approx(plain.item() + extra["rel_loss"], rel=1e-5)
    no_neg, extra_none = ContrastiveTask(model, relation_negatives=1.0)({**batch, "neg_tokens": torch.zeros_like(negs)})
    assert no_neg.item() == pytest.approx(plain.item(), rel=1e-6) and "rel_acc" not in extra_none


def test_captions_without_relations_are_a_clear_error():
    caps = ["a photo of a sneaker", "a photo of a bag"]
    _, tok = _model_and_tokenizer(caps)
    with pytest.raises(ValueError, match="relation_negatives=0"):
        relation_negative_tokens(tok, caps)


def test_training_with_relation_negatives_logs_their_accuracy(tmp_path):
    cfg = load_train_config(
        None,
        [
            *TINY,
            "data.options={n: 96, min_objects: 2, max_objects: 2}",
            "batch_size=16",
            "epochs=1",
            "log_every=1",
            "relation_negatives=1.0",
            f"out_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("rel_acc" in r for r in rows)


def test_relation_flip_eval_scores_each_image_against_its_flipped_caption():
    from vislang.evaluation.relations import relation_flip_eval

    caps = ["a red circle to the left of a blue square", "a green star", "a red star above a blue circle"]
    model, tok = _model_and_tokenizer(caps)
    own = model.encode_text(tok([caps[0], caps[2]])).detach()
    flipped = model.encode_text(tok([flip_relation(caps[0]), flip_relation(caps[2])])).detach()
    img = torch.zeros(3, own.shape[1])
    img[[0, 2]] = torch.nn.functional.normalize(own - flipped, dim=1)  # closer to the own caption by construction
    res = relation_flip_eval(model, tok, caps, img)
    assert res["n"] == 2 and res["accuracy"] == 1.0 and res["chance"] == 0.5
    img[[0, 2]] = -img[[0, 2]]
    assert relation_flip_eval(model, tok, caps, img)["accuracy"] == 0.0
    assert relation_flip_eval(model, tok, ["a green star"], img[:1]) is None
