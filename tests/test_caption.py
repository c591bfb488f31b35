"""CoCa and caption decoding: shapes, cache parity, beam = greedy at width 1, save/load, overfitting, clear errors."""

import dataclasses

import numpy as np
import pytest
import torch

import vislang
import vislang.data.transforms
from vislang.data.shapes import ShapesConfig, ShapesDataset
from vislang.data.transforms import pil_to_array
from vislang.decoding import caption, filter_logits, generate
from vislang.models.captioner import CoCa
from vislang.models.clip import DecoderConfig
from vislang.tokenizers import Tokenizer
from vislang.train import load_train_config
from vislang.train.tasks import build_task


@pytest.fixture
def coca_cfg(tiny_model_cfg):
    text = dataclasses.replace(tiny_model_cfg.text, context_length=16)
    return dataclasses.replace(tiny_model_cfg, text=text, decoder=DecoderConfig(width=24, layers=2, heads=2))


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return vislang.factory.build_model(cfg).eval()


def _images(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size), generator=g,
                         dtype=torch.uint8)  # fmt: skip


def _tokens(b=3, t=10, vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    ids[:, 0], ids[:, 6], ids[:, 7:] = 2, 3, 0
    return ids


def test_build_model_makes_coca_and_forward_has_all_outputs(coca_cfg):
    model = _model(coca_cfg)
    assert isinstance(model, CoCa)
    x = torch.randn(3, 3, 16, 16)
    out = model(x, _tokens())
    assert out["image_features"].shape == (3, 16) and out["text_features"].shape == (3, 16)
    assert out["caption_logits"].shape == (3, 9, 64)
    assert torch.allclose(out["image_features"], model.encode_image(x), atol=1e-5)  # one pass = the CLIP encoders
    assert torch.allclose(out["text_features"], model.encode_text(_tokens()), atol=1e-5)


def test_coca_task_trains_every_parameter(coca_cfg):
    model = _model(coca_cfg).train()
    task = build_task("coca", model, load_train_config(None, []))
    loss, extras = task({"image": _images(coca_cfg), "tokens": _tokens()})
    loss.backward()
    assert {"caption_loss", "contrastive_loss"} <= set(extras)
    assert loss.item() == pytest.approx(extras["contrastive_loss"] + 2.0 * extras["caption_loss"], rel=1e-4)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_caption_task_needs_a_decoder(tiny_model_cfg):
    with pytest.raises(ValueError, match="model.decoder"):
        build_task("caption", vislang.factory.build_model(tiny_model_cfg), None)


def test_coca_needs_a_causal_transformer_text_tower(coca_cfg):
    with pytest.raises(ValueError, match="causal"):
        CoCa(dataclasses.replace(coca_cfg, text=dataclasses.replace(coca_cfg.text, arch="gru")))


def test_caption_logits_are_causal(coca_cfg):
    """Changing a later token must not change the logits of earlier positions (teacher forcing is honest)."""
    model = _model(coca_cfg)
    x, ids = torch.randn(1, 3, 16, 16), _tokens(1)
    a = model(x, ids)["caption_logits"]
    ids2 = ids.clone()
    ids2[0, 4] = 7
    b = model(x, ids2)["caption_logits"]
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5) and not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("kw", [{}, {"beam": 3}, {"beam": 4, "length_penalty": 0.0}, {"sample": True, "seed": 3},
                                {"sample": True, "seed": 5, "top_k": 5, "top_p": 0.8, "temperature": 0.7}])  # fmt: skip
def test_kv_cache_gives_the_same_tokens(coca_cfg, kw):
    model = _model(coca_cfg)
    imgs = _images(coca_cfg, b=4)
    cached = model.generate(imgs, max_length=12, use_cache=True, **kw)
    plain = model.generate(imgs, max_length=12, use_cache=False, **kw)
    assert torch.equal(cached, plain)


def test_cached_logits_match_the_full_forward(coca_cfg):
    model = _model(coca_cfg)
    imgs = torch.randn(2, 3, 16, 16)
    ids = _tokens(2)[:, :6]
    full = model(imgs, torch.cat([ids, ids[:, :1]], 1))["caption_logits"]  # (2, 6, V): position t predicts t+1
    state = model.start_decoding(imgs, use_cache=True)
    for t in range(1, 7):
        step = model.next_logits(state, ids[:, :t])
        assert torch.allclose(step, full[:, t - 1], atol=1e-4), t


def test_beam_width_one_is_greedy(coca_cfg):
    for seed in range(3):
        model = _model(coca_cfg, seed)
        imgs = _images(coca_cfg, b=5, seed=seed)
        assert torch.equal(model.generate(imgs, max_length=10, beam=1), generate(model, imgs, max_length=10))
        from vislang.decoding import _beam_search

        state = model.start_decoding(vislang.data.transforms.normalize(imgs, (0.5,) * 3, (0.5,) * 3))
        beam1 = _beam_search(model, state, 5, 10, 1, 1.0, 2, 3, 0)  # the beam code path itself, at width 1
        assert torch.equal(beam1, generate(model, imgs, max_length=10))


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(coca_cfg):
    model = _model(coca_cfg)
    imgs = _images(coca_cfg, b=4)

    def logprob(ids):
        full = torch.cat([torch.full((ids.shape[0], 1), 2), ids], 1)
        logits = model(vislang.data.transforms.normalize(imgs, (0.5,) * 3, (0.5,) * 3), full)["caption_logits"]
        lp = logits.log_softmax(-1).gather(-1, ids[:, :, None])[..., 0]
        return (lp * (ids != 0)).sum(1)

    greedy = model.generate(imgs, max_length=8)
    beam = model.generate(imgs, max_length=8, beam=4, length_penalty=0.0)
    assert (logprob(beam) >= logprob(greedy) - 1e-4).all()


def test_generate_output_layout(coca_cfg):
    model = _model(coca_cfg)
    ids = model.generate(_images(coca_cfg, b=6), max_length=5)
    assert ids.dtype == torch.long and ids.shape[0] == 6 and ids.shape[1] <= 5
    for row in ids.tolist():
        if 3 in row:  # after the end token, only padding
            assert all(t == 0 for t in row[row.index(3) + 1 :])


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


@pytest.mark.parametrize(
    "kw,match",
    [({"max_length": 0}, "max_length"), ({"max_length": -3}, "max_length"), ({"beam": 0}, "beam"),
     ({"beam": -1}, "beam"), ({"top_p": 0.0}, "top_p"), ({"temperature": 0.0}, "temperature"),
     ({"top_k": -1}, "top_k"), ({"max_length": 40}, "context"), ({"beam": 2, "sample": True}, "not both")],
)  # fmt: skip
def test_bad_generation_options_are_clear_errors(coca_cfg, kw, match):
    with pytest.raises(ValueError, match=match):
        _model(coca_cfg).generate(_images(coca_cfg), **kw)


def test_bad_images_are_clear_errors(coca_cfg):
    model = _model(coca_cfg)
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(torch.zeros(0, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        model.generate(torch.zeros(3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        model.generate(torch.zeros(1, 3, 20, 20, dtype=torch.uint8))
    with pytest.raises(TypeError, match="tensor"):
        model.generate(np.zeros((1, 3, 16, 16), dtype=np.uint8))


def test_save_pretrained_round_trips_coca(coca_cfg, tmp_path):
    model = _model(coca_cfg)
    model.save_pretrained(tmp_path / "m")
    loaded = vislang.from_pretrained(tmp_path / "m")
    assert isinstance(loaded, CoCa) and loaded.cfg == model.cfg
    imgs = _images(coca_cfg)
    assert torch.equal(loaded.generate(imgs, max_length=8, beam=2), model.generate(imgs, max_length=8, beam=2))
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded(x, _tokens(2))["caption_logits"], model(x, _tokens(2))["caption_logits"])


def test_old_model_dirs_without_a_decoder_still_load(tiny_model_cfg, tmp_path):
    clip = vislang.factory.build_model(tiny_model_cfg)
    clip.save_pretrained(tmp_path / "c")
    assert type(vislang.from_pretrained(tmp_path / "c")) is vislang.models.CLIP


def test_tiny_model_overfits_eight_captions():
    """8 shapes scenes, 8 different captions: a tiny captioner must reproduce each one exactly."""
    ds = ShapesDataset("val", n=8, cfg=ShapesConfig(image_size=32, max_objects=2))
    pils, caps = zip(*[(ds[i][0], ds[i][1]) for i in range(8)])
    assert len(set(caps)) == 8
    images = torch.from_numpy(
        np.stack([pil_to_array(p, 16, 3) for p in pils]).transpose(0, 3, 1, 2).copy()
    )  # (8,3,16,16)
    tok = Tokenizer.train(caps, vocab_size=80, context_length=24)
    cfg = vislang.models.ModelConfig(
        embed_dim=16,
        vision=vislang.models.VisionConfig(image_size=16, channels=3, width=8, depth=2, mean=(0.5,) * 3,
                                           std=(0.5,) * 3),
        text=vislang.models.TextConfig(vocab_size=tok.vocab_size, context_length=24, width=32, layers=1, heads=2),
        decoder=DecoderConfig(width=32, layers=1, heads=2),
    )  # fmt: skip
    torch.manual_seed(0)
    model = vislang.factory.build_model(cfg)
    task = build_task("caption", model, None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = {"image": images, "tokens": tok(list(caps))}
    for _ in range(300):
        loss, _ = task(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    want = [tok.decode(row) for row in batch["tokens"]]  # the captions as the tokenizer spells them back
    assert caption(model, tok, images, max_length=22) == want
    assert caption(model, tok, images, max_length=22, beam=3) == want


def test_caption_loss_lives_in_losses_and_ignores_padding():
    from vislang.losses import caption_loss
    from vislang.train.tasks import caption_loss as from_tasks

    assert from_tasks is caption_loss  # the old import path keeps working
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[2, 5, 6, 3, 0], [2, 4, 3, 0, 0]])  # BOS ... EOS pad
    logp = logits.log_softmax(-1)
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, 3), (1, 0, 4), (1, 1, 3)]  # (row, position, next token); pads skipped
    want = -sum(logp[b, t, k] for b, t, k in targets) / len(targets)
    assert caption_loss(logits, tokens, pad_id=0).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="expected \\(B, T-1, V\\)"):
        caption_loss(logits, tokens[:, :4], pad_id=0)
