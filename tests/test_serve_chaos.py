"""The chaos benchmark's small version: a real `vislang serve` under mixed good and hostile load while a second
process adds items, is SIGKILLed, and is run again. No 5xx, no wrong answer, no traceback in the server's log,
every added item exactly once, the server alive at the end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="the index needs faiss-cpu")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'vislang[serve]')")
pytest.importorskip("httpx", reason="the load client needs httpx")

CHAOS = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"


def test_chaos_smoke_run_has_no_server_error_and_keeps_every_item_once(tmp_path):
    spec = importlib.util.spec_from_file_location("chaos_bench", CHAOS)
    chaos = importlib.util.module_from_spec(spec)
    sys.modules["chaos_bench"] = chaos
    spec.loader.exec_module(chaos)
    res = chaos.main(["--smoke", "--json", str(tmp_path / "chaos.json")])
    assert res["alive"] and res["5xx"] == 0 and res["server_tracebacks"] == 0
    assert not res["wrong"], res["wrong"]
    assert res["exact"], (res["items"], res["expected"], res["new_keys"], res["distinct_keys"])
    assert res["writer"]["codes"] == [-9, 0] and 0 < res["writer"]["killed_at"] < res["writer"]["new"]
    hostile = {kind for kind, _, _ in chaos.hostile_requests(b"")} | {"disconnect"}
    assert hostile <= set(res["sent"]), hostile - set(res["sent"])
    assert res["loris"].get(408, 0) >= 1  # a slow body was cut off
    assert res["phases"]["during writer"]["n"] > 0 and res["phases"]["after writer"]["n"] > 0
