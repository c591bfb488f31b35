"""The service keeps answering under faults and hostile use (issue 28): uploads are decoded off the event loop, a
full search queue answers 503, foreign Host headers and cross-site posts are refused, inputs that used to raise
deep inside answer 400/404, and /v1/images sends only files inside the build's folders, without their EXIF."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu (pip install faiss-cpu)")
pytest.importorskip("fastapi", reason="the server needs fastapi (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.index import build_index, open_index  # noqa: E402
from vislang.serve import create_app  # noqa: E402

SEARCH = {"text": "a red circle", "k": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    model = make_tiny_model(root)
    images = write_images(root / "images", 6)
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0)}  # GPS: latitude
    Image.open(images[0]).convert("RGB").save(root / "images" / "gps.jpg", exif=exif.tobytes())
    build_index(str(root / "images"), root / "ix", model, progress=False)
    return {"root": root, "model": model, "images": images, "index": root / "ix"}


@pytest.fixture(scope="module")
def client(world):
    with TestClient(create_app(world["index"]), raise_server_exceptions=False) as c:
        yield c


def id_of(world, path) -> int:
    with open_index(world["index"]) as ix:
        return ix.ids_for_keys([str(path.resolve())])[str(path.resolve())]


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


def test_an_upload_is_decoded_off_the_event_loop(world):
    """While one upload decodes (held here on an event), /healthz and searches still answer: the decode runs in a
    worker thread, not on the loop every request shares."""
    with TestClient(create_app(world["index"]), raise_server_exceptions=False) as c:
        svc = c.app.state.service
        decoding, release = threading.Event(), threading.Event()
        real = svc.uploaded_image

        def slow_decode(image, endpoint):
            decoding.set()
            release.wait(20)
            return real(image, endpoint)

        svc.uploaded_image = slow_decode
        upload = threading.Thread(target=lambda: c.post("/v1/embed", files={"image": ("a.png", png_bytes())}))
        upload.start()
        try:
            assert decoding.wait(20)
            answers = {}
            probe = threading.Thread(
                target=lambda: answers.update(h=c.get("/healthz"), s=c.post("/v1/search", json=SEARCH))
            )
            probe.start()
            probe.join(15)
            assert not probe.is_alive(), "/healthz waited for an upload's decode"
            assert answers["h"].status_code == 200 and answers["s"].status_code == 200
        finally:
            release.set()
            upload.join(20)


def test_a_full_search_queue_answers_503_with_retry_after(world):
    with TestClient(create_app(world["index"], max_queue=1), raise_server_exceptions=False) as c:
        batcher = c.app.state.batcher
        searching, release = threading.Event(), threading.Event()
        real = batcher.search

        def held(vectors, k):
            searching.set()
            release.wait(20)
            return real(vectors, k)

        batcher.search = held
        results = []
        first = threading.Thread(target=lambda: results.append(c.post("/v1/search", json=SEARCH)))
        first.start()
        assert searching.wait(20)
        queued = threading.Thread(target=lambda: results.append(c.post("/v1/search", json=SEARCH)))
        queued.start()
        while batcher.depth < 1:
            queued.join(0.01)
        health = c.get("/healthz").json()
        assert health["search_worker"] == "alive" and health["search_queue"] == 1
        r = c.post("/v1/search", json=SEARCH)
        release.set()
        first.join(20)
        queued.join(20)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "retry" in r.json()["error"]
        assert [x.status_code for x in results] == [200, 200]


def test_foreign_host_headers_and_cross_site_posts_are_refused(world):
    with TestClient(create_app(world["index"], allowed_hosts=["localhost", "127.0.0.1"]),
                    base_url="http://localhost:8000", raise_server_exceptions=False) as c:  # fmt: skip
        assert c.post("/v1/search", json=SEARCH).status_code == 200
        r = c.get("/healthz", headers={"Host": "attacker.example"})  # DNS rebinding: the browser sends its name
        assert r.status_code == 400 and "--allowed-host" in r.json()["error"]
        assert c.get("/healthz", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        r = c.post("/v1/search", json=SEARCH, headers={"Origin": "https://attacker.example"})
        assert r.status_code == 403 and "cross-site" in r.json()["error"]
        assert c.post("/v1/search", json=SEARCH, headers={"Origin": "null"}).status_code == 403
        assert c.post("/v1/search", json=SEARCH, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert c.post("/v1/search", json=SEARCH, headers={"Origin": "http://localhost:8000"}).status_code == 200


def test_the_page_cannot_be_framed(client):
    r = client.get("/")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "request_kwargs, status",
    [
        ({"method": "GET", "url": "/v1/images/%C2%B2"}, 404),  # "²".isdigit() is true, int("²") raises
        ({"method": "POST", "url": "/v1/search", "content": '{"text": "a", "k": ' + "9" * 5000 + "}"}, 400),
        (
            {"method": "POST", "url": "/v1/search", "content": '{"embedding": ' + "[" * 100_000 + "]" * 100_000 + "}"},
            400,
        ),  # fmt: skip
        ({"method": "POST", "url": "/v1/search", "json": {"image_id": 10**20}}, 404),
        ({"method": "POST", "url": "/v1/classify", "json": {"image_id": 10**20, "labels": ["a", "b"]}}, 404),
    ],
    ids=["superscript-id", "5000-digit-int", "deep-nesting", "huge-id", "huge-id-classify"],
)
def test_inputs_that_used_to_be_500_are_client_errors(client, request_kwargs, status):
    headers = {"content-type": "application/json"} if "content" in request_kwargs else None
    r = client.request(**request_kwargs, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["status"] == status
    assert client.post("/v1/search", json=SEARCH).status_code == 200


def test_a_label_with_a_backslash_is_classified(client, world):
    """Labels starting with a vowel go through the article fix ("a apple" -> "an apple"), which used a regex
    template: a backslash in the label was a bad escape and a 500."""
    r = client.post("/v1/classify", json={"image_id": id_of(world, world["images"][0]), "labels": ["a\\d", "b"]})
    assert r.status_code == 200, r.text
    assert {x["label"] for x in r.json()["labels"]} == {"a\\d", "b"}


def test_served_images_lose_their_exif(client, world):
    jpg = world["root"] / "images" / "gps.jpg"
    assert Image.open(jpg).getexif().get(0x010F) == "SecretCam"  # the file on disk has it
    r = client.get(f"/v1/images/{id_of(world, jpg)}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    served = Image.open(io.BytesIO(r.content))
    assert not served.getexif() and b"SecretCam" not in r.content
    assert served.size == Image.open(jpg).size and served.convert("RGB").getpixel((3, 3)) == Image.open(jpg).convert(
        "RGB"
    ).getpixel((3, 3))


def test_a_file_swapped_for_a_symlink_after_the_build_is_not_served(tmp_path, world):
    images = write_images(tmp_path / "images", 2)
    build_index(str(tmp_path / "images"), tmp_path / "ix", world["model"], progress=False)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), "blue").save(secret)
    images[1].unlink()
    images[1].symlink_to(secret)
    with open_index(tmp_path / "ix") as ix:
        ids = ix.ids_for_keys([str(p.resolve()) for p in images[:1]])
        swapped = ix.ids_for_keys([str(images[1])])[str(images[1])]
    with TestClient(create_app(tmp_path / "ix"), raise_server_exceptions=False) as c:
        assert c.get(f"/v1/images/{next(iter(ids.values()))}").status_code == 200
        r = c.get(f"/v1/images/{swapped}")
        assert r.status_code == 403 and "symlink" in r.json()["error"]


def test_an_item_outside_the_recorded_roots_is_not_served(tmp_path, world):
    """An index whose items name files elsewhere (written through the API, or by an older build) does not serve
    them: only the folders a build recorded are served."""
    import numpy as np

    images = write_images(tmp_path / "images", 2)
    build_index(str(tmp_path / "images"), tmp_path / "ix", world["model"], progress=False)
    elsewhere = write_images(tmp_path / "elsewhere", 1)[0]
    with open_index(tmp_path / "ix") as ix:
        [new_id] = ix.add(np.ones((1, ix.dim), np.float32), [{"key": str(elsewhere), "path": str(elsewhere)}])
    with TestClient(create_app(tmp_path / "ix"), raise_server_exceptions=False) as c:
        r = c.get(f"/v1/images/{int(new_id)}")
        assert r.status_code == 403 and "outside" in r.json()["error"]
        assert images


def test_a_slow_body_is_cut_off_with_408():
    from vislang.serve.guard import Guard

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app saw a request whose body never came")

    sent = []

    async def never():  # a client that announces a body and never sends it
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/search", "headers": [(b"content-length", b"10")]}
    asyncio.run(asyncio.wait_for(Guard(app, None, 1000, body_timeout=0.2)(scope, never, send), 10))
    assert sent[0]["status"] == 408


def test_generative_work_beyond_its_queue_is_answered_503():
    from fastapi import HTTPException

    from vislang.serve.guard import Limiter

    async def scenario():
        limiter, release = Limiter(running=1, waiting=1), asyncio.Event()

        async def work():
            async with limiter:
                await release.wait()

        tasks = [asyncio.create_task(work()) for _ in range(2)]  # one at work, one waiting
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPException) as refused:
            await work()
        release.set()
        await asyncio.gather(*tasks)
        async with limiter:  # free again
            pass
        return refused.value

    e = asyncio.run(scenario())
    assert e.status_code == 503 and e.headers["Retry-After"] == "1"


def test_healthz_reports_a_dead_search_worker_as_503(world):
    with TestClient(create_app(world["index"]), raise_server_exceptions=False) as c:
        c.app.state.batcher._thread = threading.Thread(target=lambda: None)  # a worker that has stopped
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["search_worker"] == "dead"
        assert json.loads(r.text)["status"] != "ok"


def test_serve_refuses_a_public_bind_without_a_key_and_limits_connections(world, monkeypatch):
    import uvicorn

    from vislang.cli.main import main

    monkeypatch.delenv("VISLANG_API_KEY", raising=False)
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert main(["serve", "--index", str(world["index"]), "--host", "0.0.0.0"]) != 0 and not ran  # refused
    assert main(["serve", "--index", str(world["index"]), "--allowed-host", "photos.example.org"]) == 0
    assert ran["limit_concurrency"] == 64 and ran["timeout_keep_alive"] == 5
    with TestClient(ran["app"], base_url="http://photos.example.org", raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "rebound.attacker.example"}).status_code == 400


def test_an_index_built_before_roots_were_recorded_serves_its_source_folder_only(tmp_path, world):
    images = write_images(tmp_path / "images", 2)
    build_index(str(tmp_path / "images"), tmp_path / "ix", world["model"], progress=False)
    with open_index(tmp_path / "ix") as ix:  # as an older vislang left it: the build's source, no roots
        ix.db.execute("DELETE FROM state WHERE name = 'roots'")
        first = ix.ids_for_keys([str(images[0].resolve())])[str(images[0].resolve())]
    with TestClient(create_app(tmp_path / "ix"), raise_server_exceptions=False) as c:
        assert c.get(f"/v1/images/{first}").status_code == 200
