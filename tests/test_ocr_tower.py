"""The reader of rendered words: the OCR-shaped image tower, the character tokenizer, and a tiny reader that learns."""

import numpy as np
import pytest
import torch

import vislang
from vislang.data.rendered_text import RenderConfig, RenderedText, english_words
from vislang.data.transforms import pil_to_array
from vislang.decoding import caption
from vislang.models import ModelConfig, TextConfig, VisionConfig, build_vision_tower
from vislang.models.captioner import CoCa
from vislang.models.clip import DecoderConfig
from vislang.models.towers import TextLineCNN
from vislang.tokenizers import Tokenizer, load_tokenizer
from vislang.train import load_train_config
from vislang.train.tasks import build_task


@pytest.mark.parametrize(
    "size,width,depth,context,tokens,dim",
    [(64, 16, 4, 1, 16, 64), (64, 32, 4, 0, 16, 128), (64, 16, 3, 0, 16, 64), (32, 8, 2, 2, 8, 16)],
)
def test_text_tower_gives_a_row_of_column_tokens(size, width, depth, context, tokens, dim):
    cfg = VisionConfig(arch="cnn-text", image_size=size, channels=1, width=width, depth=depth, context_layers=context)
    tower = build_vision_tower(cfg)
    assert isinstance(tower, TextLineCNN) and tower.width == dim
    x = torch.randn(2, 1, size, size)
    out = tower.forward_tokens(x)
    assert out.shape == (2, tokens, dim)  # one token per 4-px column strip
    assert torch.allclose(tower(x), out.mean(1), atol=1e-6) and tower.pools_token_mean


def test_text_tower_tokens_follow_the_columns_and_every_weight_learns():
    """Without the context block a token sees only nearby columns; with it, gradients still reach every weight."""
    tower = build_vision_tower(VisionConfig(arch="cnn-text", image_size=64, channels=1, width=8, depth=4)).eval()
    x = torch.zeros(1, 1, 64, 64)
    x[..., 20:40, 44:52] = 1.0  # a stroke on the right: the left-hand tokens cannot see it
    moved = tower.forward_tokens(x) - tower.forward_tokens(torch.zeros_like(x))  # (1, 16, D)
    changed = moved.abs().amax(-1)[0] > 1e-6
    assert not changed[:5].any() and changed[10:13].all()
    tower = build_vision_tower(
        VisionConfig(arch="cnn-text", image_size=64, channels=1, width=8, depth=4, context_layers=1)
    )
    tower.forward_tokens(torch.randn(3, 1, 64, 64)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())


def test_text_tower_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="depth >= 2"):
        build_vision_tower(VisionConfig(arch="cnn-text", image_size=64, depth=1))
    with pytest.raises(ValueError, match="divisible by 4"):
        build_vision_tower(VisionConfig(arch="cnn-text", image_size=30, depth=3))


def test_caption_text_config_builds_a_reader_with_one_decoder_position_per_column():
    cfg = load_train_config(vislang.__path__[0] + "/configs/caption-text.yaml", [])
    mcfg = vislang.factory.get_model_config(cfg.model_name, cfg.model)
    assert (mcfg.vision.arch, mcfg.vision.channels, mcfg.text.tokenizer, cfg.task) == ("cnn-text", 1, "char", "caption")
    assert mcfg.vision.context_layers == 1
    model = vislang.factory.build_model(mcfg).eval()
    assert isinstance(model, CoCa) and model.decoder.image_pos_embedding.shape[0] == 16
    x = torch.randn(2, 1, 64, 64)
    ids = torch.tensor([[2, 7, 8, 9, 3, 0, 0, 0, 0, 0, 0, 0]] * 2)
    out = model(x, ids)
    assert out["caption_logits"].shape == (2, 11, mcfg.text.vocab_size)
    assert torch.allclose(out["image_features"], model.encode_image(x), atol=1e-5)  # token mean = the pooled pass


def test_char_tokenizer_spells_every_word_one_id_per_letter(tmp_path):
    words = english_words()
    tok = Tokenizer.train(["cat", "dog"], kind="char", context_length=12)  # letters it never saw still get ids
    assert tok.vocab_size == 5 + 26 + 1  # specials, a-z, the space token
    rng = np.random.default_rng(0)
    randoms = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), n)) for n in rng.integers(1, 11, 200)]
    for w in [*words, *randoms, "abcdefghijklmnopqrstuvwxyz"]:
        (ids,) = tok.encode_ids([w])
        assert len(ids) == len(w) and tok.unk_id not in ids
    assert len({tok.encode_ids([c])[0][0] for c in "abcdefghijklmnopqrstuvwxyz"}) == 26
    rows = tok(list(words[:50]))
    assert [tok.decode(r) for r in rows] == list(words[:50])
    assert tok.decode(tok(["two words"])[0]) == "two words" and tok.decode(tok(["Café"])[0]) == "cafe"
    tok.save(tmp_path)
    assert torch.equal(load_tokenizer(tmp_path)(list(words[:50])), rows)


def test_tiny_reader_learns_eight_rendered_words_exactly():
    """8 rendered words, grayscale, char tokens: a tiny CRNN-shaped captioner must spell each one back."""
    ds = RenderedText("train", n=8, cfg=RenderConfig(image_size=32))
    pils, words = zip(*[ds[i][:2] for i in range(8)])
    assert len(set(words)) == 8
    images = torch.from_numpy(np.stack([pil_to_array(p, 32, 1) for p in pils]).transpose(0, 3, 1, 2).copy())
    tok = Tokenizer.train(words, kind="char", context_length=12)
    cfg = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn-text", image_size=32, channels=1, width=8, depth=3),
        text=TextConfig(vocab_size=tok.vocab_size, context_length=12, width=32, layers=1, heads=2),
        decoder=DecoderConfig(width=32, layers=1, heads=2),
    )
    torch.manual_seed(0)
    model = vislang.factory.build_model(cfg)
    task = build_task("caption", model, None)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    batch = {"image": images, "tokens": tok(list(words))}
    for _ in range(300):  # about 65 steps reach the threshold
        loss, _ = task(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert caption(model.eval(), tok, images, max_length=11) == list(words)
