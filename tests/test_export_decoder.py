"""ONNX export of a captioner's decoder step: the image context and next-token logits match PyTorch within 1e-4
(fp32) at batch sizes and prefix lengths other than the exported ones, and a greedy loop over the ONNX step
reproduces ``CoCa.generate``."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip(
    "onnxruntime", reason="ONNX export needs the 'deploy' extra: pip install onnx onnxruntime onnxscript"
)
pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript: pip install onnxscript")

from vislang.export import export_onnx  # noqa: E402
from vislang.factory import from_pretrained  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def exported_captioner(tmp_path_factory):
    """The decoder files alone (two exports, not export_onnx's four: the towers are tested in test_export.py)."""
    from test_compress_tiny import tiny_captioner_dir
    from vislang.export.onnx import check_decoder_parity, export_decoder

    root = tmp_path_factory.mktemp("export_coca")
    model_dir = tiny_captioner_dir(root)
    model = from_pretrained(model_dir)
    (root / "onnx").mkdir()
    export_decoder(model, root / "onnx")
    return model_dir, root / "onnx", check_decoder_parity(model, root / "onnx")


def test_caption_decoder_step_parity_at_any_batch_and_length(exported_captioner):
    import onnxruntime as ort

    from vislang.export.onnx import CONTEXT_FILE, STEP_FILE, step_inputs

    model_dir, onnx_dir, report = exported_captioner
    assert report["context_max_abs_diff"] <= TOL and report["step_max_abs_diff"] <= TOL
    ref = from_pretrained(model_dir)
    ctx = ort.InferenceSession(str(onnx_dir / CONTEXT_FILE), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(onnx_dir / STEP_FILE), providers=["CPUExecutionProvider"])
    for batch, length in ((3, 2), (2, 12)):  # neither is a shape the step was exported or checked with
        images, prefix = step_inputs(ref, batch, length, seed=batch * length)
        with torch.inference_mode():
            want = ref.next_logits(ref.start_decoding(images), prefix)  # the cached path generation uses
        context = ctx.run(None, {"images": images.numpy()})[0]
        got = step.run(None, {"context": context, "prefix": prefix.numpy()})[0]  # (B, V)
        assert got.shape == tuple(want.shape) and np.abs(got - want.numpy()).max() <= TOL


def test_greedy_loop_over_the_onnx_step_reproduces_generate(exported_captioner):
    import onnxruntime as ort

    from vislang.export.onnx import CONTEXT_FILE, STEP_FILE, step_inputs

    model_dir, onnx_dir, _ = exported_captioner
    ref = from_pretrained(model_dir)
    images, _ = step_inputs(ref, 4, 1, seed=5)
    ctx = ort.InferenceSession(str(onnx_dir / CONTEXT_FILE), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(onnx_dir / STEP_FILE), providers=["CPUExecutionProvider"])
    context = ctx.run(None, {"images": images.numpy()})[0]
    prefix = np.full((4, 1), ref.cfg.decoder.bos_id, dtype=np.int64)
    for _ in range(5):  # no end token is forced: an untrained model rarely emits one, and the ids must agree anyway
        logits = step.run(None, {"context": context, "prefix": prefix})[0]
        prefix = np.concatenate([prefix, logits.argmax(-1)[:, None]], axis=1)
    want = ref.generate(images, max_length=5, eos_id=-1)  # (B, 5) without the begin token
    assert np.array_equal(prefix[:, 1:], want.numpy())


def test_non_clip_model_types_are_refused(tmp_path):
    from test_compress_tiny import tiny_vqa_dir

    with pytest.raises(ValueError, match="covers dual encoders, captioners .* and text-to-image generators"):
        export_onnx(tiny_vqa_dir(tmp_path), tmp_path / "o")


@pytest.mark.slow
def test_export_onnx_adds_the_decoder_for_a_captioner(tmp_path, capsys):
    from test_compress_tiny import tiny_captioner_dir
    from vislang.cli.main import main

    model_dir = tiny_captioner_dir(tmp_path)
    assert main(["export", str(model_dir), "--onnx", str(tmp_path / "onnx")]) == 0
    assert "decoder step:    max abs diff vs PyTorch" in capsys.readouterr().out
    onnx = json.loads((tmp_path / "onnx" / "config.json").read_text())["onnx"]
    assert onnx["decoder_step"] == "decoder_step.onnx" and onnx["max_abs_diff"]["decoder_step"] <= TOL
