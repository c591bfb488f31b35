"""Generative VQA: prompted generation (prefix), the answer-only loss mask, a tiny model that learns a handful of
questions exactly through `vislang train` and answers them with `vislang vqa`, and clear errors for bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import vislang
from vislang.cli.main import main
from vislang.data.vqa import VQASet
from vislang.decoding import _beam_search, generate
from vislang.evaluation import vqa as vqa_eval
from vislang.losses import answer_loss, answer_mask
from vislang.models import vqa_generative as vg
from vislang.models.clip import DecoderConfig
from vislang.models.vqa import load_vqa, vqa_head
from vislang.tokenizers import Tokenizer
from vislang.train.config import load_vqa_gen_config


# ------------------------------------------------------------------------------------------ generation with a prefix
@pytest.fixture
def coca(tiny_model_cfg):
    import dataclasses

    text = dataclasses.replace(tiny_model_cfg.text, context_length=16)
    cfg = dataclasses.replace(tiny_model_cfg, text=text, decoder=DecoderConfig(width=24, layers=2, heads=2))
    torch.manual_seed(0)
    return vislang.factory.build_model(cfg).eval()


def _images(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 16, 16), generator=g, dtype=torch.uint8)


def _prefix(b=4, p=5, seed=1):
    return torch.randint(5, 64, (b, p), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [{}, {"beam": 3}, {"sample": True, "seed": 2, "top_k": 8}])
def test_prefix_generation_with_cache_equals_without(coca, kw):
    imgs, prefix = _images(), _prefix()
    cached = generate(coca, imgs, max_length=8, prefix=prefix, use_cache=True, **kw)
    plain = generate(coca, imgs, max_length=8, prefix=prefix, use_cache=False, **kw)
    assert torch.equal(cached, plain)
    assert cached.shape[0] == 4 and cached.shape[1] <= 8  # the continuation only, never the prefix


def test_beam_width_one_is_greedy_with_a_prefix(coca):
    for seed in range(2):
        imgs, prefix = _images(5, seed), _prefix(5, 3 + seed, seed)
        greedy = generate(coca, imgs, max_length=7, prefix=prefix)
        assert torch.equal(generate(coca, imgs, max_length=7, prefix=prefix, beam=1), greedy)
        state = coca.start_decoding(vislang.data.transforms.normalize(imgs, (0.5,) * 3, (0.5,) * 3))
        start = torch.cat([torch.full((5, 1), 2), prefix], 1)
        assert torch.equal(_beam_search(coca, state, 5, 7, 1, 1.0, 2, 3, 0, start), greedy)  # the beam code path


def test_prefix_continuation_is_the_argmax_of_the_full_forward(coca):
    """The first generated token is what the teacher-forced forward over begin + prefix predicts next."""
    imgs, prefix = _images(3), _prefix(3)
    first = generate(coca, imgs, max_length=1, prefix=prefix)[:, 0]
    x = vislang.data.transforms.normalize(imgs, (0.5,) * 3, (0.5,) * 3)
    seq = torch.cat([torch.full((3, 1), 2), prefix, torch.zeros(3, 1, dtype=torch.long)], 1)
    assert torch.equal(coca(x, seq)["caption_logits"][:, -1].argmax(-1), first)


def test_bad_prefixes_are_clear_errors(coca):
    with pytest.raises(ValueError, match="exceeds the text context of 16 tokens.*at most 5"):
        generate(coca, _images(), max_length=8, prefix=_prefix(p=10))
    padded = _prefix()
    padded[0, -1] = 0
    with pytest.raises(ValueError, match="same length"):
        generate(coca, _images(), max_length=4, prefix=padded)
    with pytest.raises(ValueError, match="one row per image"):
        generate(coca, _images(), max_length=4, prefix=_prefix(b=2))


def test_caption_logits_with_image_index_equal_forward_on_repeated_images(coca):
    imgs = torch.randn(3, 3, 16, 16)
    index = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    ids = torch.randint(5, 64, (7, 10), generator=torch.Generator().manual_seed(3))
    ids[:, 0], ids[:, 7], ids[:, 8:] = 2, 3, 0
    ids[4] = ids[3]  # a repeated text is encoded once
    torch.testing.assert_close(coca.caption_logits(imgs, ids, index), coca(imgs[index], ids)["caption_logits"])


# ------------------------------------------------------------------------------------------------- loss and layout
def test_answer_mask_covers_only_answer_tokens_hand_checked():
    # [BOS] what colour ? [SEP] deep blue [EOS] [PAD] [PAD]
    tokens = torch.tensor([[2, 10, 11, 12, 4, 13, 14, 3, 0, 0], [2, 10, 4, 15, 3, 0, 0, 0, 0, 0]])
    mask = answer_mask(tokens, sep=4, pad=0)  # over the targets tokens[:, 1:]
    assert mask.tolist() == [
        [False, False, False, False, True, True, True, False, False],  # targets: deep, blue, [EOS]
        [False, False, True, True, False, False, False, False, False],  # targets: the answer 15 and [EOS]
    ]
    logits = torch.randn(2, 9, 20)
    loss = answer_loss(logits, tokens, sep=4, pad=0)
    picked = [(0, 4, 13), (0, 5, 14), (0, 6, 3), (1, 2, 15), (1, 3, 3)]  # (row, position, target)
    by_hand = torch.stack([-F.log_softmax(logits[r, t], -1)[y] for r, t, y in picked]).mean()
    torch.testing.assert_close(loss, by_hand)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["what colour is it ?", "is it red ?", "red", "green", "deep blue", "yellow", "yes", "no"]
    return Tokenizer.train(texts, vocab_size=100, kind="wordpiece", context_length=12)


def test_encode_pairs_layout(tokenizer):
    sep = vg.separator_id(tokenizer)
    (row,) = vg.encode_pairs(tokenizer, ["is it red?"], ["deep blue"], sep, 12).tolist()
    q, a = tokenizer.encode_ids(["is it red?", "deep blue"])
    assert row == [tokenizer.bos_id, *q, sep, *a, tokenizer.eos_id] + [tokenizer.pad_id] * (12 - len(q) - len(a) - 3)
    with pytest.raises(ValueError, match="text.context_length=13"):
        vg.encode_pairs(tokenizer, ["is it red? " * 2], ["deep blue"], sep, 12)  # 13 tokens in all
    with pytest.raises(ValueError, match="at most 8"):
        vg.encode_questions(tokenizer, ["what colour is it ? is it red?"], sep, 12)
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        vg.encode_questions(tokenizer, ["is it [MASK] ?"], sep, 12)


def test_new_answers_are_counted(monkeypatch, tokenizer, coca):
    data = VQASet(np.zeros((1, 16, 16, 3), np.uint8), np.zeros(3, np.int64), ["is it red?"] * 3,
                  [["yes"], ["no"], ["mauve"]], ["yes/no", "yes/no", "colour"])  # fmt: skip
    monkeypatch.setattr(vqa_eval, "generate_answers", lambda *a, **k: ["yes", "teal", "Mauve."])
    res = vqa_eval.evaluate_generative(coca, tokenizer, data, ["yes", "no"], 4)
    assert res["overall"] == pytest.approx(2 / 3) and res["per_type"] == {"colour": 1.0, "yes/no": 0.5}
    assert res["new_answers"] == 2 and res["new_answers_correct"] == 1
    assert res["new_answer_examples"] == {"mauve": 1, "teal": 1}


def test_packaged_config_loads_and_routes_by_task():
    from vislang.config import PACKAGED_CONFIGS
    from vislang.factory import get_model_config
    from vislang.train import load_train_config

    cfg = load_train_config(PACKAGED_CONFIGS / "vqa-gen.yaml", ["time_budget_min=1"])
    assert cfg.task == "vqa-gen" and cfg.time_budget_min == 1 and cfg.vqa.data == "shapes"
    mcfg = get_model_config(cfg.model_name, cfg.model)
    assert mcfg.decoder is not None and mcfg.text.causal and mcfg.vision.image_size == 64
    assert load_train_config(PACKAGED_CONFIGS / "vqa.yaml").vqa.n_train == 6000
    with pytest.raises(ValueError, match="task: vqa-gen"):
        load_vqa_gen_config(PACKAGED_CONFIGS / "vqa.yaml")


# -------------------------------------------------------------------------- a tiny model learns a handful of rows
ROWS = {
    "red": [("what colour is it?", "red"), ("is it red?", "yes")],
    "green": [("what colour is it?", "green"), ("is it red?", "no")],
    "blue": [("what colour is it?", "deep blue"), ("is it red?", "no")],  # a two-word answer
    "yellow": [("what colour is it?", "yellow"), ("is it red?", "no")],
}
RGB = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 30, 150), "yellow": (230, 220, 30)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa-gen")
    lines = []
    for name, qa in ROWS.items():
        img = Image.new("RGB", (20, 20), RGB[name])
        ImageDraw.Draw(img).ellipse((4, 4, 15, 15), fill=(255, 255, 255))
        img.save(root / f"{name}.png")
        lines += [json.dumps({"image": f"{name}.png", "question": q, "answer": a, "type": q.split()[0]}) for q, a in qa]
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    overrides = ["vision.width=8", "vision.depth=2", "vision.image_size=16", "text.width=32", "text.layers=1",
                 "text.heads=2", "text.vocab_size=100", "text.context_length=12", "text.tokenizer=wordpiece",
                 "embed_dim=16", "decoder.width=32", "decoder.layers=1", "decoder.heads=2"]  # fmt: skip
    config = {"task": "vqa-gen", "overrides": overrides, "data": str(root / "rows.jsonl"),
              "test_data": str(root / "rows.jsonl"), "epochs": 150, "batch_images": 4, "threads": 1,
              "optim": {"lr": 0.003, "warmup_steps": 10}, "out_dir": str(root / "run")}  # fmt: skip
    (root / "vqa-gen.yaml").write_text(json.dumps(config))
    assert main(["train", "--config", str(root / "vqa-gen.yaml")]) == 0  # routed by task: vqa-gen
    return root


def test_tiny_model_learns_every_row_exactly(trained):
    run = trained / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["head"] == "generative" and results["test"]["n"] == 8
    assert results["test"]["overall"] == 1.0, results["test"]
    assert results["test"]["new_answers"] == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.05 < losses[0]
    table = (run / "eval" / "vqa.md").read_text()
    assert "| test | 8 | 100.0 |" in table and "what" in table and "is" in table  # per question type
    answerer = vg.GenerativeAnswerer(run / "model")
    for name, qa in ROWS.items():
        for q, a in qa:
            ((got, p),) = answerer.answer(trained / f"{name}.png", q)
            assert got == a and 0.5 < p <= 1, (name, q, got, p)


def test_model_dir_is_a_coca_dir_marked_as_answerer(trained):
    d = trained / "run" / "model"
    assert vqa_head(d) == "generative"
    meta = json.loads((d / "config.json").read_text())
    assert meta["model_type"] == "vislang-clip" and meta["vqa"]["head"] == "generative"
    assert sorted(meta["vqa"]["answers"]) == ["deep blue", "green", "no", "red", "yellow", "yes"]
    assert isinstance(vislang.factory.from_pretrained(d), vislang.models.captioner.CoCa)
    with pytest.raises(ValueError, match="generative VQA model"):
        load_vqa(d)


def test_vislang_vqa_answers_with_a_generative_model(trained, capsys):
    model = str(trained / "run" / "model")
    assert main(["vqa", str(trained / "blue.png"), "what colour is it?", "--model", model]) == 0
    answer, p = capsys.readouterr().out.strip().split("\t")
    assert answer == "deep blue" and 0.5 < float(p) <= 1
    assert main(["vqa", str(trained / "red.png"), "is it red?", "--model", model, "--top-k", "3", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked) == 3 and ranked[0]["answer"] == "yes"
    assert ranked[0]["probability"] >= ranked[1]["probability"] >= ranked[2]["probability"]
    assert main(["vqa", str(trained / "red.png"), "is it red?", "--model", model, "--answer", "purple"]) == 0
    assert float(capsys.readouterr().out.split("\t")[1]) < 0.01  # any answer can be scored, even one never seen


@pytest.mark.parametrize(
    "image,question,match",
    [("red.png", "   ", "question is empty"),
     ("red.png", "is it red? " * 6, "at most 8"),
     ("rows.jsonl", "is it red?", "cannot read"),
     ("missing.png", "is it red?", "no image at")],
)  # fmt: skip
def test_bad_input_is_a_clear_error(trained, capsys, image, question, match):
    model = str(trained / "run" / "model")
    assert main(["vqa", str(trained / image), question, "--model", model]) == 2
    assert match in capsys.readouterr().err


def test_server_answers_with_a_generative_model(trained, tmp_path):
    """`vislang serve --vqa-model` takes a generative answerer too and answers what `vislang vqa` answers."""
    from fastapi.testclient import TestClient

    from test_index import make_tiny_model, write_images
    from vislang.index import build_index
    from vislang.models.vqa_generative import predict_answer
    from vislang.serve import create_app

    write_images(tmp_path / "images", 2)
    build_index(str(tmp_path / "images"), tmp_path / "ix", make_tiny_model(tmp_path), progress=False)
    model = trained / "run" / "model"
    with TestClient(create_app(tmp_path / "ix", vqa_model=model), raise_server_exceptions=False) as client:
        png = (trained / "blue.png").read_bytes()
        upload = {"image": ("b.png", png, "image/png")}
        r = client.post("/v1/vqa", files=upload, data={"question": "what colour is it?"})
        assert r.status_code == 200, r.text
        got = r.json()["answers"]
        assert got[0]["answer"] == "deep blue"
        want = predict_answer(str(model), trained / "blue.png", "what colour is it?")
        assert got[0]["probability"] == pytest.approx(want[0][1], rel=1e-5)
        r = client.post("/v1/vqa", files=upload, data={"question": "  "})
        assert r.status_code == 400 and "empty" in r.json()["error"]
