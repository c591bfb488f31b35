"""Image–text matching: the hard-negative sampler, the ITM model and task, saving/loading, re-ranking, the CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import vislang
from _tiny import TINY as BASE
from vislang.cli.main import main
from vislang.evaluation import embed_images, embed_texts
from vislang.evaluation.rerank import recall_from_ranking, rerank, rerank_eval
from vislang.evaluation.retrieval import dedupe_captions, relevance_pairs, retrieval_metrics
from vislang.factory import build_model
from vislang.losses import itm_loss, sample_hard_negatives
from vislang.models.clip import CLIP, DecoderConfig, ITMConfig
from vislang.models.fusion import FusionConfig
from vislang.models.itm import ITMModel
from vislang.train.config import TrainConfig
from vislang.train.tasks import build_task


def duplicate_mask(groups: torch.Tensor) -> torch.Tensor:
    return groups[:, None] == groups[None, :]


# --- sampler ---------------------------------------------------------------------------------------------------------
def test_sampler_never_picks_a_positive_even_with_repeated_captions():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = int(torch.randint(2, 12, (1,), generator=g))
        groups = torch.randint(0, max(1, b // 2), (b,), generator=g)  # many identical captions
        positive = duplicate_mask(groups)
        sim = torch.randn(b, b, generator=g) * 10
        sim[positive] += 50  # positives are the most similar: the sampler must still skip them
        neg_text, neg_image = sample_hard_negatives(sim, positive, generator=g)
        rows = torch.arange(b)
        has = ~positive.all(1)
        assert torch.equal(neg_text >= 0, has) and torch.equal(neg_image >= 0, ~positive.T.all(1))
        assert not positive[rows[has], neg_text[has]].any()  # never the own caption or an identical one
        assert not positive.T[rows[neg_image >= 0], neg_image[neg_image >= 0]].any()


def test_sampler_draws_in_proportion_to_the_softmax_of_non_positives():
    sim = torch.tensor([[3.0, 1.0, 0.0, 2.0, -1.0]])
    positive = torch.tensor([[True, False, False, True, False]])  # own caption (0) and a duplicate of it (3)
    g = torch.Generator().manual_seed(1)
    draws, _ = sample_hard_negatives(sim.expand(4000, 5), positive.expand(4000, 5), g)  # 4000 independent rows
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = torch.softmax(torch.tensor([1.0, 0.0, -1.0]), 0)  # over candidates 1, 2, 4
    assert freq[0] == 0 and freq[3] == 0
    assert torch.allclose(freq[[1, 2, 4]], expected, atol=0.03)


def test_sampler_marks_rows_without_negatives_and_rejects_bad_input():
    positive = torch.ones(3, 3, dtype=torch.bool)  # the same caption for every image
    neg_text, neg_image = sample_hard_negatives(torch.zeros(3, 3), positive)
    assert (neg_text == -1).all() and (neg_image == -1).all()
    with pytest.raises(ValueError, match="same"):
        sample_hard_negatives(torch.zeros(3, 4), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        sample_hard_negatives(torch.zeros(3, 3), torch.eye(3))
    with pytest.raises(ValueError, match=r"\(P, 2\)"):
        itm_loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


# --- model -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def itm_cfg(tiny_model_cfg):
    return dataclasses.replace(tiny_model_cfg, itm=ITMConfig(FusionConfig(dim=16, depth=1, heads=2)))


def batch(cfg, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = cfg.vision
    images = torch.randn(b, v.channels, v.image_size, v.image_size, generator=g)
    ids = torch.randint(4, cfg.text.vocab_size, (b, cfg.text.context_length), generator=g)
    ids[:, 7:] = 0  # padding after 7 tokens
    ids[:, 6] = 3
    return images, ids


def test_forward_gives_contrastive_features_and_itm_pairs_without_duplicate_negatives(itm_cfg):
    torch.manual_seed(0)
    model = build_model(itm_cfg)
    assert isinstance(model, ITMModel)
    images, ids = batch(itm_cfg)
    ids[4] = ids[1]  # a repeated caption: text 4 matches image 1 and text 1 matches image 4
    out = model(images, ids, itm=True)
    B = images.shape[0]
    assert out["image_features"].shape == out["text_features"].shape == (B, 16)
    P = out["itm_logits"].shape[0]
    assert out["itm_logits"].shape == (P, 2) and P == 3 * B
    assert out["itm_labels"][:B].eq(1).all() and out["itm_labels"][B:].eq(0).all()
    img, txt = out["itm_pairs"].T
    assert torch.equal(img[:B], torch.arange(B)) and torch.equal(txt[:B], torch.arange(B))
    same_caption = (ids[img] == ids[txt]).all(1)
    assert not same_caption[B:].any()  # no negative pair has the image's own (or an identical) caption
    loss = itm_loss(out["itm_logits"], out["itm_labels"])
    loss.backward()
    for name in ("fusion", "itm_head", "visual", "text"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_forward_without_itm_matches_the_encoders_and_match_score_matches_the_pairs(itm_cfg):
    torch.manual_seed(0)
    model = build_model(itm_cfg).eval()
    images, ids = batch(itm_cfg)
    with torch.no_grad():
        out = model(images, ids)
        assert "itm_logits" not in out
        torch.testing.assert_close(out["image_features"], model.encode_image(images))
        torch.testing.assert_close(out["text_features"], model.encode_text(ids))  # dedupe + trimming are exact
        pairs = model(images, ids, itm=True)
        logits = pairs["itm_logits"][: images.shape[0]]
        torch.testing.assert_close(model.match_score(images, ids), logits[:, 1] - logits[:, 0])


def test_all_identical_captions_leave_only_positive_pairs(itm_cfg):
    model = build_model(itm_cfg)
    images, ids = batch(itm_cfg)
    ids[:] = ids[0]
    out = model(images, ids, itm=True)
    assert out["itm_logits"].shape[0] == images.shape[0] and out["itm_labels"].eq(1).all()


def test_every_fusion_kind_builds_and_trains(itm_cfg):
    for kind in ("concat", "sum", "gated", "cross_attention"):
        cfg = dataclasses.replace(itm_cfg, itm=ITMConfig(FusionConfig(kind=kind, dim=16, depth=1, heads=2)))
        model = build_model(cfg)
        images, ids = batch(cfg)
        out = model(images, ids, itm=True)
        itm_loss(out["itm_logits"], out["itm_labels"]).backward()
        assert model.itm_head.weight.grad is not None, kind


def test_save_and_load_round_trip_and_old_dirs_load_as_clip(itm_cfg, tiny_model_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(itm_cfg).eval()
    model.save_pretrained(tmp_path / "itm")
    meta = json.loads((tmp_path / "itm" / "config.json").read_text())
    assert meta["model_type"] == "vislang-itm" and meta["model"]["itm"]["fusion"]["kind"] == "cross_attention"
    loaded = vislang.from_pretrained(tmp_path / "itm")
    assert isinstance(loaded, ITMModel)
    images, ids = batch(itm_cfg)
    torch.testing.assert_close(loaded.match_score(images, ids), model.match_score(images, ids))
    build_model(tiny_model_cfg).save_pretrained(tmp_path / "clip")
    assert json.loads((tmp_path / "clip" / "config.json").read_text())["model_type"] == "vislang-clip"
    assert type(vislang.from_pretrained(tmp_path / "clip")) is CLIP


def test_bad_configs_are_clear_errors(itm_cfg, tiny_model_cfg):
    with pytest.raises(ValueError, match="model.itm"):
        build_task("itm", build_model(tiny_model_cfg), TrainConfig(task="itm"))
    with pytest.raises(ValueError, match="not both"):
        build_model(dataclasses.replace(itm_cfg, decoder=DecoderConfig(width=16, layers=1, heads=2)))
    with pytest.raises(ValueError, match="unknown fusion"):
        build_model(dataclasses.replace(itm_cfg, itm=ITMConfig(FusionConfig(kind="film"))))
    model = build_model(itm_cfg)
    images, ids = batch(itm_cfg)
    with pytest.raises(ValueError, match="both images and texts"):
        model(images, None, itm=True)


def test_itm_task_returns_both_losses(itm_cfg):
    model = build_model(itm_cfg)
    task = build_task("itm", model, TrainConfig(task="itm"))
    images, ids = batch(itm_cfg)
    loss, extras = task({"image": (images.sigmoid() * 255).to(torch.uint8), "tokens": ids.int()})
    assert {"contrastive_loss", "itm_loss", "itm_acc"} <= set(extras)
    assert loss.item() == pytest.approx(extras["contrastive_loss"] + extras["itm_loss"], rel=1e-5)


# --- re-ranking ------------------------------------------------------------------------------------------------------
def test_recall_from_ranking_matches_retrieval_metrics():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(25, 8, generator=g), dim=-1)
    text_to_image = [np.array([i, (i * 7) % 40]) for i in range(25)]  # two relevant images per text
    ref = retrieval_metrics(img, txt, text_to_image, ks=(1, 5, 10))
    t_idx, i_idx = relevance_pairs(text_to_image)
    top = (txt @ img.T).topk(10, dim=1).indices
    t2i, n_q = recall_from_ranking(top, np.sort(t_idx * 40 + i_idx), 40, (1, 5, 10))
    top = (img @ txt.T).topk(10, dim=1).indices
    i2t, _ = recall_from_ranking(top, np.sort(i_idx * 25 + t_idx), 25, (1, 5, 10))
    for k in (1, 5, 10):
        assert t2i[k] == pytest.approx(ref[f"text_to_image_R@{k}"])
        assert i2t[k] == pytest.approx(ref[f"image_to_text_R@{k}"])
    assert n_q == 25


def test_rerank_with_an_oracle_lifts_r1_and_a_constant_keeps_the_order():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(30, 50, generator=g)
    truth = torch.randint(0, 50, (30,), generator=g)
    oracle = rerank(sim, 16, lambda q, c: (c == truth[q]).float(), logit_scale=0.0)
    flat = rerank(sim, 16, lambda q, c: torch.zeros(len(q)), logit_scale=0.0)
    top16 = sim.topk(16, dim=1).indices
    assert torch.equal(flat["itm"], top16) and torch.equal(oracle["contrastive"], top16)
    in_top = (top16 == truth[:, None]).any(1)
    assert torch.equal(oracle["itm"][:, 0] == truth, in_top)  # every hit within the top-16 moves to rank 1


def test_rerank_eval_reports_both_orders_and_checks_its_input(itm_cfg, tiny_model_cfg):
    torch.manual_seed(0)
    model = build_model(itm_cfg)
    v = itm_cfg.vision
    images = torch.randint(0, 255, (24, v.channels, v.image_size, v.image_size), dtype=torch.uint8)
    captions = [f"cap {i % 10}" for i in range(24)]  # repeated captions: merged into 10 queries

    def tok(texts):
        ids = torch.zeros(len(texts), itm_cfg.text.context_length, dtype=torch.long)
        for r, t in enumerate(texts):
            ids[r, :3] = torch.tensor([2, 10 + int(t.split()[1]), 3])
        return ids

    res = rerank_eval(model, tok, images, k=10, captions=captions)
    assert res["text_to_image"]["n_queries"] == 10 and res["image_to_text"]["n_queries"] == 24
    emb = embed_images(model, images)
    texts, rel = dedupe_captions(captions)
    ref = retrieval_metrics(emb, embed_texts(model, tok, texts), rel)
    for d in ("text_to_image", "image_to_text"):
        assert set(res[d]) == {"contrastive", "itm", "itm+itc", "n_queries"}
        for k in (1, 5, 10):
            assert res[d]["contrastive"][f"R@{k}"] == pytest.approx(ref[f"{d}_R@{k}"])
    assert res["gain_R@1"]["text_to_image/itm"] == pytest.approx(
        res["text_to_image"]["itm"]["R@1"] - res["text_to_image"]["contrastive"]["R@1"]
    )
    with pytest.raises(ValueError, match="at least the largest"):
        rerank_eval(model, tok, images, k=4, captions=captions)
    with pytest.raises(ValueError, match="no image–text matching head"):
        rerank_eval(build_model(tiny_model_cfg), tok, images, captions=captions)


# --- command line ----------------------------------------------------------------------------------------------------
TINY = [
    *BASE,
    "data.options={n: 64}",
    "batch_size=16",
    "epochs=1",
    "time_budget_min=null",
    "log_every=2",
    "eval_max=16",
    "model.itm.fusion.dim=16",
    "model.itm.fusion.depth=1",
    "model.itm.fusion.heads=2",
]


def test_cli_train_itm_config_then_rerank_eval(tmp_path, capsys):
    rc = main(["train", "--config", "itm", *[f"--{o}" for o in TINY], f"--out_dir={tmp_path / 'run'}",
               f"--data.cache_dir={tmp_path / 'c'}"])  # fmt: skip
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert steps and all({"itm_loss", "contrastive_loss", "itm_acc"} <= set(r) for r in steps)
    assert isinstance(vislang.from_pretrained(tmp_path / "run" / "model"), ITMModel)
    capsys.readouterr()
    rc = main(["rerank-eval", "--model", str(tmp_path / "run" / "model"), "--split", "val", "--max-images", "32",
               "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["val"]["n_images"] == 32 and "R@1" in res["val"]["text_to_image"]["itm"]
    assert json.loads(capsys.readouterr().out) == res


def test_cli_rerank_eval_on_a_dual_encoder_is_a_clear_error(tmp_path, tiny_model_cfg, capsys):
    build_model(tiny_model_cfg).save_pretrained(tmp_path / "clip")
    rc = main(["rerank-eval", "--model", str(tmp_path / "clip"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2
    assert "vislang train --config itm" in capsys.readouterr().err
