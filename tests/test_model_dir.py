"""atomic_dir: a failed save leaves the previous model directory as it was and no temporary folder behind."""

import pytest

from vislang.model_dir import atomic_dir


def test_failed_write_keeps_the_old_directory(tmp_path):
    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(d) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError("crash mid-save")
    assert (d / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(d) as tmp:
        (tmp / "config.json").write_text("new")
    assert (d / "config.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_crash_between_the_two_renames_keeps_the_old_model(tmp_path, monkeypatch):
    """The save moves the old directory aside, then renames the new one in: a crash in between must not leave the
    model missing; the next load (run_or_model_dir) or save puts the old one back."""
    from pathlib import Path

    from vislang.model_dir import run_or_model_dir

    d = tmp_path / "model"
    with atomic_dir(d) as tmp:
        (tmp / "config.json").write_text("old")
    real_rename, calls = Path.rename, []

    def crash_on_second_rename(self, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")  # between `d -> .old` and `tmp -> d`
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(d) as tmp:
            (tmp / "config.json").write_text("new")
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not d.exists()  # the crash window itself
    assert (run_or_model_dir(d) / "config.json").read_text() == "old"
    with atomic_dir(d) as tmp:
        (tmp / "config.json").write_text("newer")
    assert (d / "config.json").read_text() == "newer"
