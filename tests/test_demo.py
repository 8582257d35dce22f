"""The offline demo (`make run` without a token): it draws a gallery, indexes it with the shipped
small CLIP and finds what each of its searches names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bot.cli import main
from bot.demo import DEMO_QUERIES
from store.library import DB_FILE
from tests.conftest import NOT_A_DATABASE


def test_demo_finds_what_each_search_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "demo"), "demo"]) == 0
    out = capsys.readouterr().out
    assert "80 new, 0 already indexed." in out
    for query in DEMO_QUERIES:
        section = out.split(f"search: {query!r}\n", 1)[1]
        first_hit = section.splitlines()[0]
        objects = re.findall(r"an? (\w+) (\w+)", query)
        wanted = "-".join(f"{colour}-{shape}" for colour, shape in objects)
        assert re.search(rf"/\d{{4}}-{wanted}\.(jpg|png)$", first_hit), (query, first_hit)
    assert "look-alikes of" in out
    assert "SHOEBOX_CLIP_MODEL=shoebox-tiny shoebox --data" in out
    # a second run finds everything already indexed
    assert main(["--data", str(tmp_path / "demo"), "demo"]) == 0
    assert "0 new, 80 already indexed." in capsys.readouterr().out


def test_a_demo_folder_that_cannot_be_opened_says_how_to_start_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / DB_FILE).write_bytes(NOT_A_DATABASE)
    assert main(["--data", str(folder), "demo", "--images", "4"]) != 0
    err = capsys.readouterr().err
    assert f"or delete {folder} to start the demo afresh" in err and "Traceback" not in err
    assert (folder / DB_FILE).read_bytes() == NOT_A_DATABASE  # nothing of it was overwritten
