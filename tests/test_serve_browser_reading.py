"""The page's read-and-translate box, driven in headless Chromium against a real uvicorn: it appears only when the
server has a reader, shows what /v1/translate answers for a chosen image, and shows the server's error for a file
that is not an image."""

from __future__ import annotations

from test_reading_zh import make_tiny_reader  # noqa: E402
from test_serve_browser import TIMEOUT_MS, ServerThread, browser, world  # noqa: F401  (fixtures)
from vislang.models.reading import Reader  # noqa: E402
from vislang.serve import create_app  # noqa: E402


def test_read_box(world, browser, tmp_path):  # noqa: F811
    from PIL import Image

    with ServerThread(create_app(world["index"])) as url:  # no reader: no box
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("() => capabilities.search === true", timeout=TIMEOUT_MS)
        assert not page.is_visible("#read-form")
        page.close()
    reader = make_tiny_reader(world["root"])
    sign = tmp_path / "sign.png"
    Image.new("RGB", (48, 48), (20, 120, 40)).save(sign)
    want = Reader(reader).read([Image.open(sign)])[0]
    assert not want.has_text  # untrained: the page must show the "no text" note, not invented characters
    (tmp_path / "notes.png").write_text("not an image")
    with ServerThread(create_app(world["index"], read_model=reader)) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        page.wait_for_selector("#read-form", state="visible")
        page.set_input_files("#read-file", str(sign))
        page.wait_for_function("() => document.querySelector('#read-out').textContent.startsWith('no ')")
        assert page.text_content("#read-out") == want.note
        page.set_input_files("#read-file", str(tmp_path / "notes.png"))
        page.wait_for_function("() => document.querySelector('#read-out').classList.contains('error')")
        assert "not an image" in page.text_content("#read-out")
        page.close()
