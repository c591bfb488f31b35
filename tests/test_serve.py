"""The HTTP API through FastAPI's TestClient: every endpoint, and every kind of bad input answered with a JSON error
while the server keeps serving."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.index import Searcher, build_index, open_index  # noqa: E402
from vislang.serve import create_app  # noqa: E402
from vislang.serve.batching import SearchBatcher  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_model(root)
    images = write_images(root / "images", 10)
    build_index(str(root / "images"), root / "ix", model, progress=False)
    return {"root": root, "model": model, "images": images, "index": root / "ix"}


@pytest.fixture(scope="module")
def client(world):
    app = create_app(world["index"], max_upload_mb=0.25)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(world):
    with TestClient(create_app(world["index"], api_key=KEY), raise_server_exceptions=False) as c:
        yield c


def id_of(world, path) -> int:
    with open_index(world["index"]) as ix:
        return ix.ids_for_keys([str(path.resolve())])[str(path.resolve())]


def assert_alive(client, headers=None) -> None:
    r = client.post("/v1/search", json={"text": "a red circle", "k": 2}, headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def assert_error(r, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == status and words in body["error"], body


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------- happy paths


def test_healthz_and_page(client):
    r = client.get("/healthz")
    assert r.json().pop("pid") == os.getpid()  # the test client runs the app in this process
    assert {k: v for k, v in r.json().items() if k != "pid"} == {
        "status": "ok",
        "size": 10,
        "dim": 16,
        "search_worker": "alive",
        "search_queue": 0,
        "capabilities": {
            "search": True,
            "embed": True,
            "classify": True,
            "caption": False,
            "vqa": False,
            "generate": False,
            "read": False,
        },
    }
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop"' in page.text and "/v1/search" in page.text


def test_search_text_ranked_with_urls(client):
    r = client.post("/v1/search", json={"text": "a blue square", "k": 4})
    body = r.json()
    assert r.status_code == 200 and body["query"] == "text" and body["k"] == 4
    scores = [h["score"] for h in body["results"]]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert all(h["url"] == f"/v1/images/{h['id']}" and h["name"].endswith(".png") for h in body["results"])
    assert client.post("/v1/search", json={"text": "x", "k": 50}).json()["results"].__len__() == 10  # k > size


def test_search_by_upload_embedding_and_id_find_the_image(client, world):
    p = world["images"][3]
    want = id_of(world, p)
    r = client.post("/v1/search", files={"image": ("q.png", p.read_bytes(), "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["id"] == want and top["score"] == pytest.approx(1.0, abs=1e-4)
    assert top["caption"] == p.with_suffix(".txt").read_text()

    emb = client.post("/v1/embed", files={"image": ("q.png", p.read_bytes(), "image/png")}).json()["embeddings"][0]
    assert client.post("/v1/search", json={"embedding": emb, "k": 1}).json()["results"][0]["id"] == want
    assert client.post("/v1/search", json={"image_id": want, "k": 1}).json()["results"][0]["id"] == want


def test_embed_texts(client):
    r = client.post("/v1/embed", json={"texts": ["a red circle", "a blue square"]})
    body = r.json()
    emb = np.asarray(body["embeddings"])
    assert body["dim"] == 16 and emb.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_classify_upload_and_indexed(client, world):
    p = world["images"][0]
    r = client.post(
        "/v1/classify",
        files={"image": ("a.png", p.read_bytes(), "image/png")},
        data={"labels": "red circle, blue square,green star"},
    )
    ranked = r.json()["labels"]
    assert r.status_code == 200 and sorted(x["label"] for x in ranked) == ["blue square", "green star", "red circle"]
    probs = [x["probability"] for x in ranked]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
    by_id = client.post(
        "/v1/classify", json={"image_id": id_of(world, p), "labels": ["red circle", "blue square", "green star"]}
    ).json()
    assert [x["label"] for x in by_id["labels"]] == [x["label"] for x in ranked]  # same image, same ranking
    assert_error(client.post("/v1/classify", json={"image_id": 1, "labels": ["one"]}), 400, "at least two")


@pytest.mark.parametrize(
    "task, words",
    [("caption", "restart it with --caption-model DIR"), ("vqa", "restart it with --vqa-model DIR"),
     ("generate", "restart it with --generate-model DIR")],
)  # fmt: skip
def test_generative_endpoints_answer_501_without_their_models(client, task, words):
    assert_error(client.post(f"/v1/{task}", json={"image_id": 1, "question": "x"}), 501, words)
    assert_alive(client)


def test_image_bytes_and_openapi(client, world):
    p = world["images"][2]
    r = client.get(f"/v1/images/{id_of(world, p)}")
    assert r.status_code == 200 and r.content == p.read_bytes()
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/embed", "/v1/classify", "/v1/images/{image_id}", "/healthz"} <= set(spec["paths"])
    content = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)


def test_docs_page_works_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()  # nothing to fetch from the network
    for asset, kind in [("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "css")]:
        r = client.get(f"/docs-assets/{asset}")
        assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.content) > 10_000
    assert client.get("/redoc").status_code == 404  # ReDoc only loads from a CDN: not offered


def test_server_sees_items_added_by_another_process(client, world, tmp_path):
    extra = write_images(tmp_path / "more", 2, split="val")
    build_index(str(tmp_path / "more"), world["index"], progress=False)  # a second writer on the same index
    client.app.state.service._checked = 0.0  # skip the once-a-second throttle
    assert len(client.post("/v1/search", json={"text": "x", "k": 100}).json()["results"]) == 12
    from vislang.index import remove_from_index

    assert remove_from_index(world["index"], [str(p) for p in extra]) == 2
    client.app.state.service._checked = 0.0
    assert len(client.post("/v1/search", json={"text": "x", "k": 100}).json()["results"]) == 10


def test_a_batch_embeds_once_and_reads_its_metadata_once(world):
    """Queries queued together cost one text-tower call and one SQLite read for all their hits, and each still
    gets the answer it would get alone."""
    searcher = Searcher(world["index"], read_only=True)
    texts = ["a red circle", "a blue square", "a green star", "a small yellow triangle"] * 2
    alone = {t: [h["id"] for h in searcher.search_text(t, 3)] for t in texts}
    embeds, gets, gate = [], [], threading.Event()
    real_get = searcher.index.get

    def embed(batch):
        embeds.append(len(batch))
        if len(embeds) == 1:
            gate.wait(10)  # hold the first batch: the others queue up behind it
        return searcher.embed_texts(batch)

    searcher.index.get = lambda ids: gets.append(len(ids)) or real_get(ids)
    batcher = SearchBatcher(embed, searcher.search_vectors)
    futures = [batcher.submit(3, text=texts[0])]
    while not embeds:
        time.sleep(0.01)
    futures += [batcher.submit(3, text=t) for t in texts[1:]]
    gate.set()
    assert [[h["id"] for h in f.result(10)] for f in futures] == [alone[t] for t in texts]
    assert embeds == [1, 7] and len(gets) == 2  # two batches: one tower call and one metadata read each
    searcher.close()


# --------------------------------------------------------------------------------------------- bad input


def test_oversized_uploads_413_announced_or_streamed(client):
    big = b"\x89PNG\r\n\x1a\n" + b"\x00" * 300_000  # over the 0.25 MB cap
    assert_error(client.post("/v1/search", files={"image": ("big.png", big, "image/png")}), 413, "over the limit")
    assert_alive(client)

    def stream():  # chunked: no Content-Length to check up front
        for _ in range(40):
            yield b"\x00" * 10_000

    r = client.post("/v1/search", content=stream(), headers={"content-type": "application/octet-stream"})
    assert_error(r, 413, "over the limit")
    assert_alive(client)


def test_non_images_and_bombs(client, world):
    cases = [
        (b"just some text, not an image", 415, "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, 415, "could not be decoded"),  # right magic, broken body
        (world["images"][0].read_bytes()[:60], 415, "could not be decoded"),  # truncated PNG
        (png_header_only(7000, 7000), 400, "over the limit of 40000000"),  # over our pixel limit
        (png_header_only(100_000, 100_000), 400, "decompression bomb"),  # over PIL's own limit
        (b"", 400, "empty"),
    ]
    for endpoint in ("/v1/search", "/v1/embed"):
        for data, status, words in cases:
            r = client.post(endpoint, files={"image": ("x.png", data, "image/png")})
            assert_error(r, status, words)
            assert_alive(client)


def test_wrong_content_types_and_malformed_bodies(client, world):
    assert_error(
        client.post("/v1/search", content=b"a red circle", headers={"content-type": "text/plain"}),
        415,
        "unsupported content type",
    )
    assert_error(
        client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "not valid JSON",
    )
    assert_error(client.post("/v1/search", json=["a list"]), 400, "must be an object")
    assert_error(client.post("/v1/search", json={"k": 3}), 400, "exactly one of")
    assert_error(client.post("/v1/search", json={"text": "x", "image_id": 1}), 400, "exactly one of")
    assert_error(client.post("/v1/search", json={"text": "   "}), 400, "empty text")
    assert_error(client.post("/v1/search", json={"text": "x" * 5000}), 400, "longer than")
    assert_error(client.post("/v1/search", json={"embedding": [1, 2]}), 400, "list of 16")
    nan = b'{"embedding": [' + b",".join([b"NaN"] * 16) + b"]}"  # Python's json reads NaN
    assert_error(client.post("/v1/search", content=nan, headers={"content-type": "application/json"}), 400, "finite")
    assert_error(client.post("/v1/search", data={"k": "3"}), 415, "x-www-form-urlencoded")
    assert_error(client.post("/v1/search", files={"k": (None, "3")}), 400, "needs an image file")
    p = world["images"][0].read_bytes()
    assert_error(client.post("/v1/search", files={"photo": ("x.png", p, "image/png")}), 400, "upload the image as")
    assert_error(client.post("/v1/embed", json={"texts": []}), 400, "non-empty")
    assert_error(client.post("/v1/embed", json={"texts": ["x"] * 300}), 400, "at most 256")
    assert_error(client.get("/v1/search"), 405, "Method Not Allowed")
    assert_error(client.get("/nothing/here"), 404, "Not Found")
    assert_alive(client)


@pytest.mark.parametrize("k", [0, -1, 10**9, "abc", True, 2.5, None])
def test_bad_k(client, k):
    assert_error(client.post("/v1/search", json={"text": "a red circle", "k": k}), 400, "k must be")
    assert_alive(client)


@pytest.mark.parametrize(
    "path, words",
    [
        ("/v1/images/999999", "no image with id 999999"),
        ("/v1/images/0", "no image with id 0"),
        ("/v1/images/-1", "no image with id '-1'"),
        ("/v1/images/abc", "no image with id 'abc'"),
        ("/v1/images/..%2F..%2F..%2Fetc%2Fpasswd", "Not Found"),  # decoded to a path no route matches
        ("/v1/images/..%2Fmeta.sqlite", "Not Found"),
        ("/v1/images/%2e%2e", "no image with id '..'"),
        ("/v1/images/1%00.png", "no image with id '1\\x00.png'"),
        ("/v1/images/1e3", "no image with id '1e3'"),
        ("/v1/images/99999999999999999999999", "no image with id '9999"),
    ],
)
def test_unknown_ids_and_path_traversal_404(client, path, words):
    r = client.get(path)
    assert_error(r, 404, words)
    assert b"root:" not in r.content and b"SQLite" not in r.content
    assert_alive(client)


def test_unknown_image_id_in_search_and_classify(client):
    assert_error(client.post("/v1/search", json={"image_id": 424242}), 404, "no image with id 424242")
    assert_error(client.post("/v1/classify", json={"image_id": "1", "labels": ["a", "b"]}), 400, "must be an integer")
    assert_alive(client)


def test_api_key_required_everywhere_but_healthz(keyed, world):
    assert keyed.get("/healthz").status_code == 200
    for method, path in [
        ("post", "/v1/search"),
        ("post", "/v1/embed"),
        ("post", "/v1/classify"),
        ("post", "/v1/caption"),
        ("get", "/v1/images/1"),
        ("get", "/"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
    ]:
        r = getattr(keyed, method)(path)
        assert_error(r, 401, "API key")
        assert 'realm="vislang"' in r.headers["www-authenticate"]
    assert keyed.get("/").headers["www-authenticate"].startswith("Basic")  # a browser shows a login prompt
    body = {"text": "a red circle", "k": 2}
    assert_error(keyed.post("/v1/search", json=body, headers={"X-API-Key": "wrong"}), 401, "API key")
    assert_error(keyed.post("/v1/search", json=body, headers={"Authorization": "Bearer " + KEY[:-1]}), 401, "API key")
    assert_error(keyed.post("/v1/search", json=body, headers={"Authorization": "Basic !!"}), 401, "API key")
    assert_error(keyed.post("/v1/search", files={"image": ("x.png", b"x" * 100, "image/png")}), 401, "API key")
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Basic {basic}"}):
        assert_alive(keyed, headers)
    assert keyed.get("/", headers={"X-API-Key": KEY}).status_code == 200


def test_serve_command_defaults_to_loopback(monkeypatch):
    from vislang.cli.main import build_parser
    from vislang.cli.serve import is_loopback

    args = build_parser().parse_args(["serve", "--index", "ix"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")


def test_png_helper_is_a_real_header():
    from PIL import Image

    assert Image.open(io.BytesIO(png_header_only(3, 2))).size == (3, 2)
