"""/v1/generate with a tiny untrained GAN made here: the server draws what the library (the `vislang generate` code
path) draws, byte for byte with a seed, refuses bad input with a JSON error naming the fix, answers 501 without
--generate-model, and keeps the API key rule."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from test_index import make_tiny_model, write_images  # noqa: E402
from test_serve import assert_alive, assert_error  # noqa: E402
from vislang.index import build_index  # noqa: E402
from vislang.serve import create_app  # noqa: E402

GAN_CAPTIONS = [f"a photo of a {c}." for c in ("sneaker", "bag", "coat", "dress", "sandal", "shirt")]
PROMPT = "a photo of a sneaker."
KEY = "gen-key"


def make_tiny_gan(root: Path) -> Path:
    """An untrained tiny text-to-image GAN run folder (``RUN/model``), as `vislang train --config gan` leaves one."""
    from vislang.factory import fit_config_to_tokenizer
    from vislang.models import CLIP, ModelConfig, TextConfig, VisionConfig
    from vislang.models.gan.build import build_gan
    from vislang.models.gan.networks import GANModelConfig
    from vislang.models.gan.pipeline import TextToImage
    from vislang.tokenizers import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train(GAN_CAPTIONS * 3, vocab_size=100, context_length=16)
    text_cfg = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(arch="cnn", image_size=28, channels=1, width=4, depth=2, mean=(0.3,), std=(0.35,)),
        text=TextConfig(arch="transformer", context_length=16, width=16, layers=1, heads=2),
    )
    encoder = CLIP(fit_config_to_tokenizer(text_cfg, tok)).eval()
    cfg = GANModelConfig(arch="dcgan", z_dim=8, cond_dim=16, image_size=28, channels=1, g_width=4, d_width=4)
    generator, _ = build_gan(cfg)
    t2i = TextToImage(cfg, generator, encoder, tok, {"sample_prompts": GAN_CAPTIONS})
    t2i.save_pretrained(root / "gan" / "model")
    return root / "gan"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    model = make_tiny_model(root)
    write_images(root / "images", 4)
    build_index(str(root / "images"), root / "ix", model, progress=False)
    return {"root": root, "index": root / "ix", "gan": make_tiny_gan(root)}


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world["index"], generate_model=world["gan"]), raise_server_exceptions=False) as c:
        yield c


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_healthz_announces_generate(client):
    caps = client.get("/healthz").json()["capabilities"]
    assert caps["generate"] is True and caps["caption"] is False and caps["vqa"] is False


def test_grid_png_is_the_generate_command_grid(client, world, tmp_path):
    from vislang.cli.generate import generate_to_file

    r = client.post("/v1/generate", json={"prompt": PROMPT, "n": 5, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    want = Path(generate_to_file(str(world["gan"]), [PROMPT], str(tmp_path / "g.png"), n=5, seed=3)).read_bytes()
    assert r.content == want  # the same prompt, n and seed: the same file `vislang generate` writes
    grid = decode(r.content)
    assert grid.size == (2 * (5 * 30 + 2), 2 * 32)  # 5 tiles of 28 px + 2 px gaps, one row, scaled 2x
    again = client.post("/v1/generate", json={"prompt": PROMPT, "n": 5, "seed": 3, "format": "png"})
    other = client.post("/v1/generate", json={"prompt": PROMPT, "n": 5, "seed": 4})
    assert again.content == r.content and other.content != r.content


def test_json_images_match_the_library(client, world):
    from vislang.models.gan.pipeline import TextToImage

    r = client.post("/v1/generate", json={"prompt": "  " + PROMPT, "n": 3, "seed": 0, "format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prompt"] == PROMPT and body["n"] == 3 and body["seed"] == 0 and body["warnings"] == []
    assert (body["width"], body["height"], body["media_type"]) == (28, 28, "image/png")
    want = TextToImage.from_pretrained(world["gan"]).generate(PROMPT, n=3, seed=0)  # (3, 1, 28, 28) uint8
    assert len(body["images"]) == 3
    for b64, w in zip(body["images"], want):
        got = torch.from_numpy(np.array(decode(base64.b64decode(b64))))
        assert torch.equal(got, w[0])
    again = client.post("/v1/generate", json={"prompt": PROMPT, "n": 3, "seed": 0, "format": "json"}).json()
    assert again["images"] == body["images"]
    first4 = client.post("/v1/generate", json={"prompt": PROMPT, "seed": 0, "format": "json"}).json()
    assert first4["n"] == 4 and first4["images"][:3] == body["images"]  # default n; a seed's first images are fixed


def test_partly_unknown_prompt_is_drawn_with_a_warning(client):
    body = client.post("/v1/generate", json={"prompt": "a photo of a zxqv", "n": 1, "format": "json"}).json()
    assert len(body["images"]) == 1 and body["seed"] is None
    assert any("never seen" in w and "zxqv" in w for w in body["warnings"])


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({}, 400, "'prompt' must be a string"),
        ({"prompt": ["a photo of a bag."]}, 400, "'prompt' must be a string"),
        ({"prompt": ""}, 400, "a prompt is empty; write what to draw"),
        ({"prompt": "   "}, 400, "a prompt is empty"),
        ({"prompt": "zxqv blorptang"}, 400, "none of the words of the prompt 'zxqv blorptang'"),
        ({"prompt": "a " * 1500}, 400, "longer than 2000 characters"),
        ({"prompt": PROMPT, "n": 0}, 400, "'n' must be an integer from 1 to 64, got 0"),
        ({"prompt": PROMPT, "n": -3}, 400, "'n' must be an integer from 1 to 64"),
        ({"prompt": PROMPT, "n": 65}, 400, "'n' must be an integer from 1 to 64, got 65"),
        ({"prompt": PROMPT, "n": 10**9}, 400, "from 1 to 64"),
        ({"prompt": PROMPT, "n": "four"}, 400, "'n' must be an integer"),
        ({"prompt": PROMPT, "n": 2.5}, 400, "'n' must be an integer"),
        ({"prompt": PROMPT, "n": True}, 400, "'n' must be an integer"),
        ({"prompt": PROMPT, "seed": -1}, 400, "'seed' must be an integer from 0"),
        ({"prompt": PROMPT, "seed": "x"}, 400, "'seed' must be an integer"),
        ({"prompt": PROMPT, "format": "gif"}, 400, "'format' must be 'png' (one grid image) or 'json'"),
    ],
)
def test_bad_generate_requests(client, body, status, words):
    assert_error(client.post("/v1/generate", json=body), status, words)
    assert_alive(client)


def test_bad_bodies_are_json_errors(client):
    assert_error(client.post("/v1/generate", content=b"{", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(client.post("/v1/generate", json=[PROMPT]), 400, "must be an object")
    assert_error(client.post("/v1/generate", content=PROMPT.encode()), 415, "send application/json")


def test_501_without_the_model_names_the_option(world):
    with TestClient(create_app(world["index"]), raise_server_exceptions=False) as c:
        assert c.get("/healthz").json()["capabilities"]["generate"] is False
        assert_error(c.post("/v1/generate", json={"prompt": PROMPT}), 501, "restart it with --generate-model DIR")


def test_api_key_guards_generate(world):
    with TestClient(create_app(world["index"], api_key=KEY, generate_model=world["gan"])) as c:
        assert_error(c.post("/v1/generate", json={"prompt": PROMPT, "n": 1}), 401, "missing or wrong API key")
        assert_error(
            c.post("/v1/generate", json={"prompt": PROMPT, "n": 1}, headers={"X-API-Key": "wrong"}), 401, "API key"
        )
        ok = c.post("/v1/generate", json={"prompt": PROMPT, "n": 1}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and decode(ok.content).format == "PNG"


def test_wrong_generate_model_stops_the_server_before_it_listens(world):
    with pytest.raises(ValueError, match="not a text-to-image GAN"):
        create_app(world["index"], generate_model=world["root"] / "model")  # a dual encoder
    with pytest.raises(FileNotFoundError, match="not a GAN model directory"):
        create_app(world["index"], generate_model=world["root"] / "nothing")


def test_from_pretrained_loads_a_gan_folder(world):
    import vislang
    from vislang.models.gan.pipeline import TextToImage

    model = vislang.from_pretrained(world["gan"] / "model")
    assert isinstance(model, TextToImage)
    want = TextToImage.from_pretrained(world["gan"]).generate(PROMPT, n=2, seed=5)
    assert torch.equal(model.generate(PROMPT, n=2, seed=5), want)


def test_serve_command_takes_the_generate_option():
    from vislang.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--index", "ix", "--generate-model", "runs/gan-fm"])
    assert args.generate_model == "runs/gan-fm"
    assert build_parser().parse_args(["serve", "--index", "ix"]).generate_model is None
