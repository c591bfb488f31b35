"""/v1/read and /v1/translate with a tiny untrained reader: the server answers what `vislang read` answers (the same
library call), translates through CC-CEDICT, and refuses bad input with 4xx, never a 500."""

from __future__ import annotations

import io

import pytest
from PIL import Image

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from test_index import make_tiny_model, write_images  # noqa: E402
from test_reading_zh import make_tiny_reader  # noqa: E402
from test_serve import assert_alive, assert_error, id_of, png_header_only  # noqa: E402
from vislang.index import build_index  # noqa: E402
from vislang.models.reading import Reader  # noqa: E402
from vislang.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reading")
    model = make_tiny_model(root)
    images = write_images(root / "images", 3)
    build_index(str(root / "images"), root / "ix", model, progress=False)
    return {"images": images, "index": root / "ix", "reader": make_tiny_reader(root, context_length=6)}


@pytest.fixture(scope="module")
def client(world):
    app = create_app(world["index"], read_model=world["reader"])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_healthz_announces_reading(client):
    assert client.get("/healthz").json()["capabilities"]["read"] is True


@pytest.mark.parametrize("path", ["/v1/read", "/v1/translate"])
def test_upload_and_indexed_image_read_as_the_library_reads(client, world, path):
    img = Image.open(world["images"][0]).convert("RGB")
    want = Reader(world["reader"]).read([img])[0].as_dict()
    r = client.post(path, files={"image": ("a.png", png(img), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {k: body[k] for k in want} == pytest.approx(want)
    if path == "/v1/translate":
        assert {"pinyin", "english", "words"} <= set(body)
    r = client.post(path, json={"image_id": id_of(world, world["images"][0])})
    assert r.status_code == 200 and r.json()["text"] == want["text"]


def test_translate_gives_pinyin_and_every_sense(client, monkeypatch):
    """The reading is fixed here (the tiny model reads nothing useful) to check the translation the server adds."""
    from vislang.models.reading import Reading

    monkeypatch.setattr(Reader, "read", lambda self, images, batch_size=64: [Reading("出口", 0.9, True)])
    r = client.post("/v1/translate", files={"image": ("a.png", png(Image.new("RGB", (32, 32))), "image/png")})
    body = r.json()
    assert body["text"] == "出口" and body["pinyin"] == "chū kǒu" and body["english"] == "an exit"
    assert "to export" in body["words"][0]["entries"][0]["senses"]


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"files": {"image": ("a.txt", b"hello, not an image", "text/plain")}}, 415, "not an image"),
        ({"files": {"image": ("big.png", png_header_only(8_000, 8_000), "image/png")}}, 400, "over the limit"),
        ({"files": {"image": ("e.png", b"", "image/png")}}, 400, "empty"),
        ({"json": {"image_id": 99_999}}, 404, "no image with id"),
        ({"json": {}}, 400, "image_id"),
    ],
)
def test_bad_requests_get_4xx(client, kwargs, status, words):
    for path in ("/v1/read", "/v1/translate"):
        assert_error(client.post(path, **kwargs), status, words)
    assert_alive(client)


def test_without_a_reader_the_endpoints_say_how_to_enable_them(world):
    app = create_app(world["index"])
    with TestClient(app, raise_server_exceptions=False) as c:
        assert_error(c.post("/v1/read", json={"image_id": 0}), 501, "--read-model")
        assert c.get("/healthz").json()["capabilities"]["read"] is False
