"""ONNX export of a tiny model: both towers match PyTorch within 1e-4 (fp32) at any batch size, the onnxruntime
back end embeds like the torch model, and bad input fails clearly."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip(
    "onnxruntime", reason="ONNX export needs the 'deploy' extra: pip install onnx onnxruntime onnxscript"
)
pytest.importorskip("onnxscript", reason="torch.onnx.export (dynamo) needs onnxscript: pip install onnxscript")

from test_compress_tiny import tiny_model_dir  # noqa: E402
from vislang.cli.main import main  # noqa: E402
from vislang.evaluation.embed import embed_images, embed_texts  # noqa: E402
from vislang.export import OnnxCLIP, export_onnx, is_onnx_dir, load_embedding_model  # noqa: E402
from vislang.export.onnx import example_inputs  # noqa: E402
from vislang.factory import from_pretrained, get_tokenizer  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model_dir = tiny_model_dir(root)
    report = export_onnx(model_dir, root / "onnx")
    return model_dir, root / "onnx", report


def test_export_parity_and_dynamic_batch(exported):
    model_dir, onnx_dir, report = exported
    assert is_onnx_dir(onnx_dir)
    assert report["image_max_abs_diff"] <= TOL and report["text_max_abs_diff"] <= TOL
    assert json.loads((onnx_dir / "config.json").read_text())["onnx"]["max_abs_diff"]["text"] <= TOL
    ref, ort_model = from_pretrained(model_dir), OnnxCLIP(onnx_dir)
    for batch in (3, 11):  # neither is the batch size the towers were exported with
        images, ids = example_inputs(ref.cfg, batch, seed=batch)
        with torch.inference_mode():
            d_img = ort_model.encode_image(images, normalize=False) - ref.encode_image(images, normalize=False)
            d_txt = ort_model.encode_text(ids, normalize=False) - ref.encode_text(ids, normalize=False)
        assert d_img.shape == (batch, ref.cfg.embed_dim) and d_img.abs().max() <= TOL
        assert d_txt.abs().max() <= TOL


def test_onnx_back_end_in_the_embed_path(exported):
    model_dir, onnx_dir, _ = exported
    ort_model, preprocess = load_embedding_model(onnx_dir)  # "auto" picks onnxruntime for an export directory
    assert isinstance(ort_model, OnnxCLIP)
    ref, _ = load_embedding_model(model_dir)
    texts = ["a red circle", "two blue squares", "a green triangle above a star"]
    tok = get_tokenizer(onnx_dir)
    a, b = embed_texts(ort_model, tok, texts, batch_size=2), embed_texts(ref, get_tokenizer(model_dir), texts)
    assert torch.allclose(a, b, atol=TOL) and torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    images = torch.randint(0, 256, (5, 3, 24, 24), dtype=torch.uint8)
    assert torch.allclose(embed_images(ort_model, images, 2), embed_images(ref, images), atol=TOL)
    from PIL import Image

    x = preprocess(Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)))
    assert tuple(x.shape) == (3, 24, 24)


def test_cli_export_prints_the_diff_and_refuses_bad_input(exported, tmp_path, capsys):
    model_dir, _, _ = exported
    assert main(["export", str(model_dir), "--onnx", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "image tower: max abs diff vs PyTorch" in out and "text tower:" in out
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "o2")]) == 2
    assert "not a vislang model directory" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        OnnxCLIP(model_dir)


def test_int8_model_cannot_be_exported(exported, tmp_path):
    from vislang.compress import compress_model_dir

    model_dir, _, _ = exported
    compress_model_dir(model_dir, "dynamic-int8", tmp_path / "int8")
    with pytest.raises(ValueError, match="export the fp32 model"):
        export_onnx(tmp_path / "int8", tmp_path / "o")


def test_cli_embed_with_onnx_backend(exported, tmp_path):
    from vislang.cli.main import main

    model_dir, onnx_dir, _ = exported
    assert (
        main(
            [
                "embed",
                "--model",
                str(onnx_dir),
                "--backend",
                "onnx",
                "--texts",
                "a red circle",
                "-o",
                str(tmp_path / "o.npy"),
            ]
        )
        == 0
    )
    assert main(["embed", "--model", str(model_dir), "--texts", "a red circle", "-o", str(tmp_path / "t.npy")]) == 0
    assert np.allclose(np.load(tmp_path / "o.npy"), np.load(tmp_path / "t.npy"), atol=TOL)


def test_index_and_search_run_an_onnx_export(exported, tmp_path):
    from PIL import Image

    from vislang.index.build import build_index, load_embedder
    from vislang.index.search import Searcher

    model_dir, onnx_dir, _ = exported
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    build_index(str(folder), tmp_path / "ix_onnx", onnx_dir, batch_size=4, progress=False)
    build_index(str(folder), tmp_path / "ix_torch", model_dir, batch_size=4, progress=False)
    s_onnx, s_torch = Searcher(tmp_path / "ix_onnx"), Searcher(tmp_path / "ix_torch")  # each with its recorded model
    assert isinstance(s_onnx.model, OnnxCLIP) and not isinstance(s_torch.model, OnnxCLIP)
    q_onnx, q_torch = s_onnx.embed_texts(["a red circle"]), s_torch.embed_texts(["a red circle"])
    assert np.allclose(q_onnx, q_torch, atol=TOL)
    paths = lambda hits: [h["path"] for h in hits]  # noqa: E731
    assert paths(s_onnx.search_text("a red circle", k=6)) == paths(s_torch.search_text("a red circle", k=6))
    assert s_onnx.search_image(folder / "3.png", k=1)[0]["path"].endswith("3.png")  # image queries through ONNX too
    with pytest.raises(ValueError, match="onnxruntime runs on the CPU"):
        load_embedder(onnx_dir, "cuda")
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    from fastapi.testclient import TestClient

    from vislang.serve import create_app

    with TestClient(create_app(tmp_path / "ix_onnx")) as c:  # the HTTP service on the ONNX export
        r = c.post("/v1/search", json={"text": "a red circle", "k": 6})
    assert r.status_code == 200
    names = [Path(h["path"]).name for h in s_torch.search_text("a red circle", k=6)]
    assert [h["name"] for h in r.json()["results"]] == names


@pytest.mark.parametrize("mixture, noise_scale", [(1, 1.0), (2, 1.0), (1, 1.2)])  # 1.2: `generate-tune`d
def test_gan_generator_exports_with_its_text_tower(tmp_path, capsys, mixture, noise_scale):
    from vislang.models.gan.build import build_generator
    from vislang.models.gan.networks import GANModelConfig
    from vislang.models.gan.pipeline import TextToImage

    enc_dir = tiny_model_dir(tmp_path)
    encoder = from_pretrained(enc_dir)
    cfg = GANModelConfig(cond_dim=encoder.cfg.embed_dim, z_dim=6, g_width=4, mixture=mixture, noise_scale=noise_scale)
    torch.manual_seed(0)
    gen = build_generator(cfg)
    gen(torch.randn(16, 6), torch.randn(16, cfg.cond_dim))  # BatchNorm statistics that are not the defaults
    t2i = TextToImage(cfg, gen, encoder, get_tokenizer(enc_dir), {"sample_prompts": []})
    t2i.save_pretrained(tmp_path / "gan")
    assert main(["export", str(tmp_path / "gan"), "--onnx", str(tmp_path / "o")]) == 0
    assert "generator:   max abs diff" in capsys.readouterr().out
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "o" / "generator.onnx"), providers=["CPUExecutionProvider"])
    z, c = torch.randn(5, 6), torch.randn(5, cfg.cond_dim)
    got = sess.run(None, {"noise": z.numpy(), "text_embeds": c.numpy()})[0]
    back = TextToImage.from_pretrained(tmp_path / "gan")
    with torch.inference_mode():
        assert np.abs(got - back.generator(z, c).numpy()).max() <= TOL
    assert is_onnx_dir(tmp_path / "o" / "text_encoder")
    meta = json.loads((tmp_path / "o" / "config.json").read_text())
    assert meta["model_type"] == "vislang-gan" and meta["onnx"]["max_abs_diff"]["generator"] <= TOL


def test_onnx_sessions_do_not_spin_between_calls():
    """Spinning idle threads took half the CPU from the torch code that ran next (2x slower), which skewed
    interleaved speed comparisons; every session vislang makes lets its threads sleep."""
    from vislang.models.onnx_runtime import session_options

    opts = session_options(2)
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
