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
