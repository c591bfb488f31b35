"""`vislang export-images`: a dataset back out as PNG + .txt pairs that the folder reader reads again."""

from PIL import Image

from vislang.cli.main import main
from vislang.data.sources import open_dataset


def test_export_shapes_round_trips_through_the_folder_reader(tmp_path, capsys):
    assert main(["export-images", "shapes", str(tmp_path / "scenes"), "--n", "3"]) == 0
    pngs = sorted((tmp_path / "scenes").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    src = open_dataset("shapes", "test")
    for i, p in enumerate(pngs):
        assert (p.with_suffix(".txt")).read_text().strip() == src[i][1]
        assert Image.open(p).size == src[i][0].size
    again = open_dataset(str(tmp_path / "scenes"))
    assert len(again) == 3 and again[0][1] == src[0][1]


def test_export_bad_input(tmp_path, capsys):
    assert main(["export-images", "no-such-dataset", str(tmp_path / "x")]) != 0
    assert "not found" in capsys.readouterr().err
    assert main(["export-images", "shapes", str(tmp_path / "y"), "--n", "-2"]) != 0
    assert "--n must be" in capsys.readouterr().err
