"""End to end in headless Chromium: the search page at ``/`` searches by text, by chosen file and by dropped file,
shows scores and images, reports errors, works behind an API key, and captions and answers questions per result when
the server has those models. Real uvicorn on a free loopback port."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip("headless browser test needs Debian's chromium at /usr/bin/chromium", allow_module_level=True)
pytest.importorskip("faiss", reason="the index needs faiss-cpu")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vislang[serve]')")
pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip install playwright)")

import uvicorn  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from test_index import make_tiny_model, write_images  # noqa: E402
from vislang.index import build_index, open_index  # noqa: E402
from vislang.serve import create_app  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
KEY = "browser-key"
TIMEOUT_MS = 15_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread; stopped on exit."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 20 s")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    model = make_tiny_model(root)
    images = write_images(root / "images", 8)
    build_index(str(root / "images"), root / "ix", model, progress=False)
    with open_index(root / "ix") as ix:
        ids = ix.ids_for_keys([str(p.resolve()) for p in images])
    return {"root": root, "images": images, "index": root / "ix", "ids": ids}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def results(page) -> list[dict]:
    page.wait_for_function("() => document.querySelectorAll('#results .result').length > 0", timeout=TIMEOUT_MS)
    return page.eval_on_selector_all(
        "#results .result",
        "els => els.map(e => ({id: +e.dataset.id, score: parseFloat(e.querySelector('.score').textContent),"
        " caption: e.querySelector('.caption').textContent}))",
    )


def wait_images_loaded(page, n: int) -> None:
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')]"
        f".filter(i => i.complete && i.naturalWidth > 0).length >= {n}",
        timeout=TIMEOUT_MS,
    )


def test_search_page_text_file_and_drop(world, browser):
    with ServerThread(create_app(world["index"])) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        assert page.title() == "vislang search"

        page.fill("#k", "5")
        page.fill("#q", "a red circle")
        page.press("#q", "Enter")
        hits = results(page)
        assert len(hits) == 5
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(h["caption"] for h in hits)  # captions from the .txt files
        wait_images_loaded(page, 5)
        assert "5 result(s)" in page.text_content("#status")
        assert page.query_selector(".caption-button") is None  # no captioning model: no caption button
        assert page.query_selector(".question") is None

        target = world["images"][4]
        page.set_input_files("#file", str(target))  # the drop zone's file chooser
        page.wait_for_function(
            f"() => document.querySelector('#results .result')?.dataset.id == '{world['ids'][str(target.resolve())]}'"
        )
        hits = results(page)
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)

        dropped = world["images"][6]
        data = base64.b64encode(dropped.read_bytes()).decode()
        dt = page.evaluate_handle(
            """(b64) => { const bin = atob(b64); const arr = new Uint8Array(bin.length);
                for (let i = 0; i < bin.length; i++) arr[i] = bin.charCodeAt(i);
                const dt = new DataTransfer(); dt.items.add(new File([arr], 'q.png', {type: 'image/png'}));
                return dt; }""",
            data,
        )
        page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
        want = world["ids"][str(dropped.resolve())]
        page.wait_for_function(f"() => document.querySelector('#results .result')?.dataset.id == '{want}'")
        wait_images_loaded(page, 1)

        page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}])
        page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
        assert "not an image" in page.text_content("#status")
        page.fill("#q", "a blue square")  # still serving after the error
        page.press("#q", "Enter")
        page.wait_for_function("() => !document.querySelector('#status').classList.contains('error')")
        assert len(results(page)) == 5
        page.close()


def test_search_page_behind_api_key(world, browser):
    with ServerThread(create_app(world["index"], api_key=KEY)) as url:
        anonymous = browser.new_context()
        assert anonymous.request.get(url + "/").status == 401  # (a page.goto would show the login prompt)
        anonymous.close()
        ctx = browser.new_context(http_credentials={"username": "me", "password": KEY})
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        assert page.goto(url + "/").status == 200
        page.fill("#q", "a green star")
        page.press("#q", "Enter")
        assert len(results(page)) == 8
        wait_images_loaded(page, 8)  # image requests carry the credentials too
        ctx.close()


def test_caption_button_and_question_box(world, browser):
    import httpx

    from test_serve_generative import QUESTIONS, make_tiny_captioner, make_tiny_vqa

    app = create_app(
        world["index"], caption_model=make_tiny_captioner(world["root"]), vqa_model=make_tiny_vqa(world["root"])
    )
    with ServerThread(app) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        page.fill("#k", "3")
        page.fill("#q", "a red circle")
        page.press("#q", "Enter")
        first = results(page)[0]["id"]
        want = httpx.post(url + "/v1/caption", json={"image_id": first}, timeout=30).json()["caption"]
        card = f"#results .result[data-id='{first}']"
        page.click(f"{card} .caption-button")
        page.wait_for_function(f'() => document.querySelector("{card} .generated").textContent === {json.dumps(want)}')
        page.fill(f"{card} .question", QUESTIONS[0])
        page.press(f"{card} .question", "Enter")
        page.wait_for_function(
            f'() => /\\(\\d\\.\\d\\d\\)$/.test(document.querySelector("{card} .generated").textContent)'
        )
        answer = httpx.post(url + "/v1/vqa", json={"image_id": first, "question": QUESTIONS[0]}, timeout=30).json()
        top = answer["answers"][0]
        assert page.text_content(f"{card} .generated") == f"{top['answer']} ({top['probability']:.2f})"
        page.close()


def test_generate_box(world, browser):
    from test_serve_generate import PROMPT, make_tiny_gan

    with ServerThread(create_app(world["index"])) as url:  # no GAN: no generate box
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("() => capabilities.search === true", timeout=TIMEOUT_MS)
        assert not page.is_visible("#generate-form")
        page.close()
    with ServerThread(create_app(world["index"], generate_model=make_tiny_gan(world["root"]))) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        page.wait_for_selector("#generate-form", state="visible")
        page.fill("#prompt", PROMPT)
        page.click("#draw")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#drawn img')].filter(i => i.complete && i.naturalWidth === 28)"
            ".length === 8"
        )
        assert f'8 image(s) of "{PROMPT}"' in page.text_content("#status")
        page.fill("#prompt", "zxqv blorptang")  # the library's prompt check, shown as the page's error
        page.click("#draw")
        page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
        assert "none of the words" in page.text_content("#status")
        page.close()
