"""The search page's "more like this" and searches addressable by URL, in headless Chromium against real uvicorn:
``/?q=...`` runs a text search on load, each result links to ``/?like=ID`` (image → image from the index), reloading
and the back button give the same results."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

import pytest

from test_serve_browser import ServerThread, browser, results, world  # noqa: F401  (fixtures)
from vislang.serve import create_app


def first_id(page) -> str:
    return page.eval_on_selector("#results .result", "e => e.dataset.id")


def test_url_search_more_like_this_reload_and_back(world, browser):  # noqa: F811
    with ServerThread(create_app(world["index"])) as url:
        page = browser.new_page()
        page.goto(url + "/?q=a+red+circle&k=4")
        hits = results(page)
        assert len(hits) == 4 and page.input_value("#q") == "a red circle" and page.input_value("#k") == "4"
        text_ids = [h["id"] for h in hits]

        target = hits[2]["id"]
        page.click(f'#results .result[data-id="{target}"] .more')
        page.wait_for_function(f"() => document.querySelector('#results .result')?.dataset.id == '{target}'")
        assert parse_qs(urlparse(page.url).query) == {"like": [str(target)], "k": ["4"]}
        hits = results(page)
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3) and len(hits) == 4  # the image itself, then others
        like_ids = [h["id"] for h in hits]

        page.reload()  # the address alone reproduces the search
        page.wait_for_function(f"() => document.querySelector('#results .result')?.dataset.id == '{target}'")
        assert [h["id"] for h in results(page)] == like_ids

        page.go_back()  # back to the text search
        page.wait_for_function("() => location.search.includes('q=')")
        page.wait_for_function(f"() => document.querySelector('#results .result')?.dataset.id == '{text_ids[0]}'")
        assert [h["id"] for h in results(page)] == text_ids

        page.fill("#q", "a blue square")
        page.press("#q", "Enter")
        page.wait_for_function("() => location.search.includes('blue')")
        assert parse_qs(urlparse(page.url).query)["q"] == ["a blue square"]

        page.goto(url + "/?like=abc")
        page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
        assert "image id" in page.text_content("#status")
        page.goto(url + "/?like=987654")
        page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
        assert "no image with id 987654" in page.text_content("#status")
        page.close()
