"""Compression of the other model families: a captioner (CoCa) and a VQA model quantised to int8 load back, run,
stay close to the fp32 model on fixed inputs, and are compared on their own metrics (CIDEr, VQA accuracy); methods a
family does not support fail with a clear error."""

import json
import shutil

import pytest
import torch

from test_compress_tiny import SHAPES, tiny_captioner_dir, tiny_vqa_dir
from vislang.compress import compress_model_dir, load_model
from vislang.export.onnx import example_inputs, step_inputs
from vislang.factory import from_pretrained

LOGIT_TOL = 0.05  # max abs difference of next-token / answer logits, int8 vs fp32, on fixed inputs


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return tiny_captioner_dir(tmp_path_factory.mktemp("coca"))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return tiny_vqa_dir(tmp_path_factory.mktemp("vqa"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("method", ["dynamic-int8", "static-int8"])
def test_captioner_int8_decodes_close_to_fp32(captioner, cache, tmp_path, method):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    from vislang.models.captioner import CoCa

    out = tmp_path / method
    info = compress_model_dir(captioner, method, out, calibration_images=32, cache_dir=cache, **SHAPES)
    assert info["family"] == "captioner" and any(n.startswith("decoder.blocks.0.") for n in info["modules"])
    ref, q = from_pretrained(captioner), from_pretrained(out)
    assert (
        isinstance(q, CoCa)
        and isinstance(q.decoder.head, QLinear)
        and isinstance(q.decoder.blocks[0].cross.kv, QLinear)
    )
    images, prefix = step_inputs(ref, 4, 6)
    with torch.inference_mode():
        for use_cache in (True, False):
            a = q.next_logits(q.start_decoding(images, use_cache), prefix)  # (B, V)
            b = ref.next_logits(ref.start_decoding(images, use_cache), prefix)
            assert a.shape == b.shape and 0 < (a - b).abs().max() < LOGIT_TOL, (a - b).abs().max()
        ids = q.generate(images, max_length=6)
    assert ids.shape[0] == 4 and ids.shape[1] <= 6
    assert json.loads((out / "config.json").read_text())["compression"]["method"] == method


def test_int8_copy_of_a_generative_vqa_model_keeps_its_marker(captioner, tmp_path):
    from vislang.models.vqa import GENERATIVE_KEY

    src = tmp_path / "vqa-gen"
    shutil.copytree(captioner, src)
    meta = json.loads((src / "config.json").read_text())
    marker = {"head": "generative", "separator_id": 3, "max_answer_tokens": 4, "answers": ["red", "blue"]}
    (src / "config.json").write_text(json.dumps({**meta, GENERATIVE_KEY: marker}))
    compress_model_dir(src, "dynamic-int8", tmp_path / "int8")
    assert json.loads((tmp_path / "int8" / "config.json").read_text())[GENERATIVE_KEY] == marker
    compress_model_dir(captioner, "dynamic-int8", tmp_path / "plain")  # a plain captioner gets no marker
    assert GENERATIVE_KEY not in json.loads((tmp_path / "plain" / "config.json").read_text())


def test_vqa_dynamic_int8_answers_close_to_fp32(vqa, tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    from vislang.models.vqa import VQAModel, load_vqa
    from vislang.tokenizers import load_tokenizer

    out = tmp_path / "int8"
    info = compress_model_dir(vqa, "dynamic-int8", out)
    assert info["family"] == "vqa" and "head.3" in info["modules"]
    assert json.loads((out / "answers.json").read_text()) == json.loads((vqa / "answers.json").read_text())
    ref, q = load_vqa(vqa)[0], load_model(out)
    assert isinstance(q, VQAModel) and isinstance(q.head[0], QLinear)
    assert isinstance(from_pretrained(out), VQAModel)  # the generic loader knows VQA directories too
    images, _ = example_inputs(ref.cfg, 3)
    tokens = load_tokenizer(vqa)(["what colour is the circle?", "how many squares are there?"] * 3)  # (6, T)
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.inference_mode():
        d = (q(images, tokens, index)["logits"] - ref(images, tokens, index)["logits"]).abs().max()
    assert 0 < d < LOGIT_TOL, d


@pytest.mark.parametrize(
    ("which", "method"), [("captioner", "prune"), ("captioner", "distill"), ("vqa", "static-int8"), ("vqa", "prune")]
)
def test_methods_a_family_does_not_support(captioner, vqa, tmp_path, which, method):
    src = {"captioner": captioner, "vqa": vqa}[which]
    with pytest.raises(ValueError, match=f"is a {which} model, for which {method} is not supported; use one of"):
        compress_model_dir(src, method, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_model_types_are_refused(captioner, tmp_path):
    import shutil

    d = tmp_path / "cls"
    shutil.copytree(captioner, d)
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "model_type": "vislang-classifier"}))
    with pytest.raises(ValueError, match="not model_type 'vislang-classifier'"):
        compress_model_dir(d, "dynamic-int8", tmp_path / "out")


def test_compare_reports_cider_and_vqa_accuracy(captioner, vqa, cache, tmp_path):
    from vislang.compress.compare import compare_models

    compress_model_dir(captioner, "dynamic-int8", tmp_path / "coca8")
    rows = compare_models(
        [captioner, tmp_path / "coca8"], batch_size=8, rounds=1, cache_dir=cache, caption_images=8, **SHAPES
    )
    assert [r["family"] for r in rows] == ["captioner", "captioner"]
    assert all(0 <= r["cider"] and "text_to_image_R@1" in r for r in rows)
    assert (
        rows[0]["params"]
        == rows[1]["params"]
        > sum(p.numel() for n, p in from_pretrained(captioner).named_parameters() if not n.startswith("decoder."))
    )
    compress_model_dir(vqa, "dynamic-int8", tmp_path / "vqa8")
    rows = compare_models([vqa, tmp_path / "vqa8"], data="shapes", max_images=8, batch_size=8, rounds=1)
    assert [r["kind"] for r in rows] == ["fp32", "dynamic-int8"]
    assert all(0 <= r["vqa_accuracy"] <= 1 and r["images_per_s"] > 0 for r in rows)
    with pytest.raises(ValueError, match="VQA model is evaluated on --data shapes or a VQA file"):
        compare_models([vqa], data="fashion-mnist", max_images=8, batch_size=8, rounds=1)
