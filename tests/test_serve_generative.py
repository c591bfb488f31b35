"""/v1/caption and /v1/vqa with tiny untrained models made here: the server answers exactly what the library (the
`vislang caption` and `vislang vqa` code paths) answers, for uploads and for indexed images, and refuses bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from test_index import make_tiny_model, write_images  # noqa: E402
from test_serve import assert_alive, assert_error, id_of, png_header_only  # noqa: E402
from vislang.index import build_index  # noqa: E402
from vislang.serve import create_app  # noqa: E402

QUESTIONS = ["what colour is the circle?", "how many objects are there?", "is there a red square?"]
ANSWERS = ["red", "blue", "green", "two", "three", "yes", "no"]


def make_tiny_captioner(root: Path) -> Path:
    """An untrained tiny CoCa (dual encoder + caption decoder) with its tokenizer, as `vislang train` saves one."""
    from vislang.models.clip import DecoderConfig

    return make_tiny_model(root, decoder=DecoderConfig(width=16, layers=1, heads=2), name="captioner")


def make_tiny_vqa(root: Path) -> Path:
    """An untrained tiny VQA model with a question tokenizer and answer vocabulary, as train_vqa saves one."""
    from vislang.models import TextConfig, VisionConfig
    from vislang.models.fusion import FusionConfig
    from vislang.models.vqa import VQAConfig, VQAModel, save_vqa
    from vislang.tokenizers import Tokenizer

    torch.manual_seed(0)
    tokenizer = Tokenizer.train(QUESTIONS * 4, vocab_size=80, context_length=12)
    cfg = VQAConfig(
        vision=VisionConfig(arch="cnn", image_size=16, channels=3, width=4, depth=2, mean=(0.5,) * 3, std=(0.5,) * 3),
        text=TextConfig(arch="transformer", context_length=12, width=16, layers=1, heads=2),
        fusion=FusionConfig(kind="cross_attention", dim=16, depth=1, heads=2),
        num_answers=len(ANSWERS),
        head_hidden=16,
    )
    text = dataclasses.replace(cfg.text, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    model = VQAModel(dataclasses.replace(cfg, text=text)).eval()
    return save_vqa(model, root / "vqa", tokenizer, ANSWERS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("generative")
    model = make_tiny_model(root)
    images = write_images(root / "images", 4)
    build_index(str(root / "images"), root / "ix", model, progress=False)
    return {
        "root": root,
        "images": images,
        "index": root / "ix",
        "captioner": make_tiny_captioner(root),
        "vqa": make_tiny_vqa(root),
    }


@pytest.fixture(scope="module")
def client(world):
    app = create_app(world["index"], caption_model=world["captioner"], vqa_model=world["vqa"])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_healthz_announces_caption_and_vqa(client):
    caps = client.get("/healthz").json()["capabilities"]
    assert caps["caption"] is True and caps["vqa"] is True and caps["generate"] is False


def test_caption_matches_the_caption_command(client, world):
    from vislang.evaluation.caption import caption_files

    p = world["images"][1]
    want_greedy = caption_files(world["captioner"], [p], max_length=12)[0][1]
    want_beam = caption_files(world["captioner"], [p], max_length=12, beam=3)[0][1]
    assert want_greedy  # an untrained model still says something, so the comparison means something
    r = client.post("/v1/caption", files={"image": ("q.png", p.read_bytes(), "image/png")}, data={"max_length": "12"})
    assert r.status_code == 200, r.text
    assert r.json() == {"caption": want_greedy}
    longest = caption_files(world["captioner"], [p], max_length=15)[0][1]  # the default: as long as the model reads
    assert client.post("/v1/caption", json={"image_id": id_of(world, p)}).json() == {"caption": longest}
    by_id = client.post("/v1/caption", json={"image_id": id_of(world, p), "max_length": 12, "beam": 3})
    assert by_id.status_code == 200 and by_id.json()["caption"] == want_beam


def test_vqa_matches_the_vqa_command(client, world):
    from vislang.models.vqa_generative import predict_answer

    p = world["images"][2]
    want = predict_answer(str(world["vqa"]), p, QUESTIONS[0], top_k=3)
    r = client.post("/v1/vqa", json={"image_id": id_of(world, p), "question": QUESTIONS[0], "top_k": 3})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["question"] == QUESTIONS[0] and [a["answer"] for a in got["answers"]] == [a for a, _ in want]
    assert [a["probability"] for a in got["answers"]] == pytest.approx([q for _, q in want], abs=1e-6)
    up = client.post(
        "/v1/vqa", files={"image": ("q.png", p.read_bytes(), "image/png")}, data={"question": QUESTIONS[0]}
    ).json()
    assert up["answers"] == got["answers"][:1]  # the same image uploaded: the same top answer


@pytest.mark.parametrize(
    "path, kwargs, status, words",
    [
        ("/v1/caption", {"json": {}}, 400, "'image_id' must be an integer"),
        ("/v1/caption", {"json": {"image_id": 999}}, 404, "no image with id 999"),
        ("/v1/caption", {"json": {"image_id": 1, "max_length": 0}}, 400, "'max_length' must be an integer from 1"),
        ("/v1/caption", {"json": {"image_id": 1, "beam": 50}}, 400, "'beam' must be an integer from 1 to 5"),
        ("/v1/caption", {"json": {"image_id": 1, "max_length": 16}}, 400, "from 1 to 15"),  # context 16 - begin
        ("/v1/caption", {"files": {"k": (None, "3")}}, 400, "multipart caption needs an image"),
        ("/v1/caption", {"files": {"image": ("x.png", b"text", "image/png")}}, 415, "not an image"),
        ("/v1/caption", {"files": {"image": ("x.png", png_header_only(10**5, 10**5), "image/png")}}, 400, "bomb"),
        ("/v1/vqa", {"json": {"image_id": 1}}, 400, "'question' must be a non-empty string"),
        ("/v1/vqa", {"json": {"image_id": 1, "question": "  "}}, 400, "empty question"),
        ("/v1/vqa", {"json": {"image_id": 1, "question": "what colour " * 20}}, 400, "ask a shorter question"),
        ("/v1/vqa", {"json": {"image_id": 1, "question": ["a?", "b?"]}}, 400, "one 'question' per request"),
        ("/v1/vqa", {"json": {"image_id": 1, "question": "red?", "top_k": 0}}, 400, "'top_k' must be"),
        ("/v1/vqa", {"json": {"image_id": True, "question": "red?"}}, 400, "'image_id' must be an integer"),
        ("/v1/vqa", {"content": b"red?", "headers": {"content-type": "text/plain"}}, 415, "unsupported content"),
    ],
)
def test_bad_caption_and_vqa_requests(client, path, kwargs, status, words):
    assert_error(client.post(path, **kwargs), status, words)
    assert_alive(client)


def test_a_dual_encoder_is_refused_as_caption_model(world):
    with pytest.raises(ValueError, match="without a caption decoder"):
        create_app(world["index"], caption_model=world["root"] / "model")
    with pytest.raises(FileNotFoundError, match="not a VQA model directory"):
        create_app(world["index"], vqa_model=world["root"] / "model" / "nothing")


def test_serve_command_takes_the_model_options():
    from vislang.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--index", "ix", "--caption-model", "c", "--vqa-model", "v"])
    assert args.caption_model == "c" and args.vqa_model == "v"
