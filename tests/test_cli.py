"""The `shoebox` command line, run as a user runs it: JSON out, exit codes, crash and restart."""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.cli import build_parser, main, unreadable_catalog
from tests.conftest import NOT_A_DATABASE, jpeg_bytes

pytestmark = pytest.mark.usefixtures("cli_env")


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, object]:
    code = main(list(args))
    out = capsys.readouterr().out
    return code, (json.loads(out) if "--json" in args and out.strip() else out)


def make_folder(root: Path, good: int, broken: int) -> Path:
    rng = np.random.default_rng(7)
    folder = root / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(good):
        pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((96, 72)).save(folder / ("nested" if i % 3 == 0 else "") / f"img{i:03d}.jpg", quality=85)
    broken_files = {
        "notes.jpg": b"just some text, not a picture",
        "page.png": b"<html><body>hello</body></html>",
        "empty.gif": b"",
        "truncated.jpg": jpeg_bytes((1, 2, 3), size=(300, 200))[:200],
        "archive.webp": b"PK\x03\x04" + b"\0" * 64,
    }
    for i, (name, data) in enumerate(list(broken_files.items())[:broken]):
        (folder / name).write_bytes(data)
    return folder


def test_index_twice_then_every_command_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    folder = make_folder(tmp_path, good=20, broken=5)
    code, summary = run_cli(capsys, "--data", data, "index", str(folder), "--json")
    assert code == 0
    assert summary["indexed"] == 20 and summary["duplicates"] == 0
    assert len(summary["failed"]) == 5 and all(f["error"] and f["path"] for f in summary["failed"])
    code, again = run_cli(capsys, "--data", data, "index", str(folder), "--json")
    assert again["indexed"] == 0 and again["unchanged"] == 20 and len(again["failed"]) == 5

    code, results = run_cli(capsys, "--data", data, "search", "a", "colourful", "photo", "--k", "3", "--json")
    assert code == 0 and len(results) == 3
    assert set(results[0]) >= {"id", "score", "source", "path", "description"}
    first = results[0]["id"]
    code, similar = run_cli(capsys, "--data", data, "similar", str(first), "--k", "2", "--json")
    assert code == 0 and len(similar) == 2 and first not in [r["id"] for r in similar]
    code, similar_file = run_cli(capsys, "--data", data, "similar", results[0]["path"], "--k", "1", "--json")
    assert similar_file[0]["id"] == first and similar_file[0]["score"] > 0.99
    code, info = run_cli(capsys, "--data", data, "describe", str(first), "--json")
    assert code == 0 and info["id"] == first and info["path"] == results[0]["path"]
    code, stats = run_cli(capsys, "--data", data, "stats", "--json")
    assert stats["images"] == 20 and stats["model"].startswith("shoebox-tiny/")
    code, forgot = run_cli(capsys, "--data", data, "forget", str(first), "--json")
    assert code == 0 and forgot == {"forgotten": first}
    code, stats = run_cli(capsys, "--data", data, "stats", "--json")
    assert stats["images"] == 19
    code, report = run_cli(capsys, "--data", data, "verify", "--json")
    assert code == 0 and report["ok"] is True


def test_user_errors_exit_1_and_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    assert main(["--data", data, "index", str(tmp_path / "missing")]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["--data", data, "describe", "12345"]) == 1
    assert "no image with id 12345" in capsys.readouterr().err
    assert main(["--data", data, "search", "x", "--after", "2027-01-01", "--before", "2020-01-01"]) == 1
    assert "after (2027-01-01) must be earlier than before (2020-01-01)" in capsys.readouterr().err
    assert main(["--data", data, "search", "x", "--after", "2024-07-14", "--before", "2024-07-14"]) == 0  # that day
    for command in ("describe", "forget", "similar"):  # past what SQLite can even look up
        assert main(["--data", data, command, str(2**63)]) == 1
        assert f"no image with id {2**63}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["--data", data, "search", "x", "--after", "2020-13-01"])
    assert usage.value.code == 2 and "must be a date like 2024-07-31, not '2020-13-01'" in capsys.readouterr().err
    for k in ("0", "1000", "many"):  # bad usage, as the README's exit codes say
        with pytest.raises(SystemExit) as usage:
            main(["--data", data, "search", "x", "--k", k])
        assert usage.value.code == 2 and "--k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["--data", data, "search"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as usage:
        main(["frobnicate"])
    assert usage.value.code == 2
    for counts in (["demo", "--images", "0"], ["caption", "--limit", "-1"]):
        with pytest.raises(SystemExit) as usage:
            main(["--data", data, *counts])
        assert usage.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["--data", data, "demo", "--images", "100000000"])  # would draw pictures until the disk filled
    assert usage.value.code == 2 and "at most 2000, not 100000000" in capsys.readouterr().err


def test_a_data_folder_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    for data in (in_the_way, in_the_way / "sub"):
        for command in (["stats"], ["demo", "--images", "2"]):
            assert main(["--data", str(data), *command]) == 1
            err = capsys.readouterr().err
            assert err.startswith("shoebox: cannot ") and "--data" in err and "Traceback" not in err


def test_reindex_stops_before_switching_when_a_stored_copy_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    folder = make_folder(tmp_path, good=4, broken=0)
    assert main(["--data", str(data), "index", str(folder)]) == 0
    next(path for path in (data / "thumbs").rglob("*") if path.is_file()).unlink()
    capsys.readouterr()
    assert main(["--data", str(data), "reindex"]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) could not be re-embedded" in err and "old vectors" in err
    code, stats = run_cli(capsys, "--data", str(data), "stats", "--json")
    assert code == 0 and stats["images"] == 4


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`shoebox search ... --json | head`: once the reader has gone, no traceback."""
    command = [sys.executable, "-m", "bot.cli", "--data", str(tmp_path / "data"), "stats", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal to stand in for a person's terminal")
def test_one_ctrl_c_at_the_chat_prompt_leaves(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    command = [sys.executable, "-m", "bot.cli", "--data", str(tmp_path / "data"), "chat"]
    proc = subprocess.Popen(command, stdin=terminal, stdout=terminal, stderr=terminal, env=os.environ.copy())
    os.close(terminal)

    def read_until(marker: bytes, seconds: float) -> bytes:
        seen = b""
        deadline = time.monotonic() + seconds
        while marker not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:  # the process closed the terminal
                    break
        return seen

    try:
        seen = read_until(b"you> ", 120)
        assert b"you> " in seen, seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)  # what the terminal sends for Ctrl-C
        after = read_until(b"interrupted", 60)
        assert proc.wait(timeout=60) == 130, after.decode(errors="replace")
        assert b"Traceback" not in after
    finally:
        proc.kill()
        os.close(controller)


def test_one_ctrl_c_leaves_a_chat_fed_by_a_pipe_that_stays_open(tmp_path: Path) -> None:
    """A script feeding questions through a pipe: Ctrl-C while the chat waits for the next line
    ends it at once, not once the next line comes."""
    command = [sys.executable, "-m", "bot.cli", "--data", str(tmp_path / "data"), "chat"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write("a red circle\n".encode())
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 120
        while seen.count(b"you> ") < 2 and time.monotonic() < deadline:  # answered, asking again
            ready, _, _ = select.select([proc.stderr], [], [], 0.2)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    break
                seen += chunk
        assert seen.count(b"you> ") == 2, seen.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # the pipe is still open: no line, no end of input
        err = seen + proc.stderr.read()
        assert b"interrupted" in err and b"Traceback" not in err, err.decode(errors="replace")
        assert proc.stdout.read().strip(), "the first question was answered"
    finally:
        proc.kill()
        proc.wait()


def test_unreachable_model_gives_advice_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOEBOX_CLIP_MODEL", "ViT-B-32")
    monkeypatch.delenv("SHOEBOX_CLIP_CHECKPOINT", raising=False)
    monkeypatch.setenv("SHOEBOX_CLIP_CHECKPOINT", str(tmp_path / "nowhere.bin"))
    assert main(["--data", str(tmp_path / "d"), "stats"]) == 1
    err = capsys.readouterr().err
    assert "SHOEBOX_CLIP_CHECKPOINT" in err and "Traceback" not in err


def test_import_descriptions_feeds_text_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(tmp_path / "data")
    folder = make_folder(tmp_path, good=6, broken=0)
    run_cli(capsys, "--data", data, "index", str(folder), "--json")
    lines = [
        json.dumps({"path": str(folder / "img001.jpg"), "description": "Aunt May's pottery workshop"}),
        "not json",
        json.dumps({"path": str(folder / "unknown.jpg"), "description": "x"}),
        json.dumps({"path": str(folder / "img002.jpg"), "description": "  "}),  # says nothing
        json.dumps({"path": 5, "description": ["x"]}),
        json.dumps(["a list"]),
    ]
    (tmp_path / "desc.jsonl").write_text("\n".join(lines))
    code, summary = run_cli(capsys, "--data", data, "import-descriptions", str(tmp_path / "desc.jsonl"), "--json")
    assert summary["updated"] == 1 and summary["bad_lines"] == [2, 4, 5, 6] and len(summary["unknown_paths"]) == 1
    code, results = run_cli(capsys, "--data", data, "search", "pottery", "--k", "1", "--json")
    assert results[0]["path"].endswith("img001.jpg") and "pottery" in results[0]["posted_text"]
    assert results[0]["description"] is None  # the file's words, not a description of its pixels
    code, out = run_cli(capsys, "--data", data, "describe", str(results[0]["id"]))
    assert "text: Aunt May's pottery workshop" in out


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def test_kill_minus_9_mid_index_then_resume_is_exact_and_consistent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    folder = make_folder(tmp_path, good=240, broken=0)
    command = [sys.executable, "-m", "bot.cli", "--data", str(data), "index", str(folder)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while _rows(data / "shoebox.sqlite3") < 40 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the indexer finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    interrupted_at = _rows(data / "shoebox.sqlite3")
    assert 0 < interrupted_at < 240

    code, summary = run_cli(capsys, "--data", str(data), "index", str(folder), "--json")
    assert code == 0 and summary["failed"] == []
    assert summary["indexed"] + summary["unchanged"] == 240
    assert _rows(data / "shoebox.sqlite3") == 240
    code, report = run_cli(capsys, "--data", str(data), "verify", "--check-only", "--json")
    assert report == {"ok": True, "problems": [], "repaired": []}
    code, stats = run_cli(capsys, "--data", str(data), "stats", "--json")
    assert stats["images"] == 240 and stats["vector_index"]["count"] == 240


def test_a_damaged_catalog_is_one_line_and_the_command_exits(tmp_path: Path) -> None:
    """Run as a user runs it: an error that still held an open connection used to print a
    traceback and then keep the process from exiting."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "shoebox.sqlite3").write_bytes(NOT_A_DATABASE)
    command = [sys.executable, "-m", "bot.cli", "--data", str(data), "stats"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode == 1, done.stderr
    assert "cannot be opened as a database (file is not a database)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_catalog_damaged_inside_is_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged page behind an intact header opens fine and fails only when it is read."""
    data = tmp_path / "data"
    assert run_cli(capsys, "--data", str(data), "index", str(make_folder(tmp_path, 60, 0)))[0] == 0
    catalog = data / "shoebox.sqlite3"
    run_cli(capsys, "--data", str(data), "verify")  # checkpoints the WAL into the file
    with closing(sqlite3.connect(catalog)) as conn:  # the pages of the images table's rows
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        table = [row[0] for row in conn.execute("SELECT pageno FROM dbstat WHERE name = 'images'")]
    pages = bytearray(catalog.read_bytes())
    for page in table:
        pages[(page - 1) * size : page * size] = b"\0" * size
    catalog.write_bytes(pages)
    for wal in data.glob("shoebox.sqlite3-*"):
        wal.unlink()
    command = [sys.executable, "-m", "bot.cli", "--data", str(data), "stats"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert done.returncode == 1, done.stderr
    assert f"{catalog} cannot be read (database disk image is malformed)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_catalog_held_too_long_by_another_process_says_so(tmp_path: Path) -> None:
    args = build_parser().parse_args(["--data", str(tmp_path), "stats"])
    line = unreadable_catalog(args, sqlite3.OperationalError("database is locked"))
    assert line is not None and line.startswith(f"{tmp_path / 'shoebox.sqlite3'} stayed locked by another Shoebox")
    # A mistake in a query is a bug to see whole, not a damaged file; and the bot has two files.
    assert unreadable_catalog(args, sqlite3.ProgrammingError("wrong number of bindings")) is None
    bot = argparse.Namespace(**{**vars(args), "command": "bot"})
    assert unreadable_catalog(bot, sqlite3.DatabaseError("database disk image is malformed")) is None


def test_a_file_given_to_look_alike_commands_is_checked_before_it_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device or a pipe would be read forever (`/dev/zero` until memory ran out), and a huge
    file whole, before its size was checked."""
    monkeypatch.setenv("SHOEBOX_MAX_FILE_MB", "1")
    data = str(tmp_path / "data")
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as handle:
        handle.truncate(3 * 1024 * 1024)  # sparse: 3 MB to the size check, nothing to the disk
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)  # nobody writes to it: reading it would wait forever
    for source, reason in ((huge, "file is 3.0 MB, over the 1 MB limit"), (pipe, "not a regular file"),
                           (Path("/dev/zero"), "not a regular file")):
        assert main(["--data", data, "ask", "like this?", "--image", str(source)]) == 1
        assert f"cannot use {source}: {reason}" in capsys.readouterr().err
    assert main(["--data", data, "similar", str(huge)]) == 1
    assert "file is 3.0 MB, over the 1 MB limit" in capsys.readouterr().err


def test_a_folder_that_cannot_be_read_is_reported_not_passed_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a mode-000 folder of another user would be. Root may read any folder, so the kernel's
    refusal is scripted: listing the folder raises what the kernel would raise."""
    folder = make_folder(tmp_path, 4, 0)
    locked = folder / "nested"
    listing = os.scandir

    def refusing(path: Any = ".") -> Any:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", refusing)
    code, summary = run_cli(capsys, "--data", str(tmp_path / "data"), "index", str(folder), "--json")
    assert code == 0 and summary["indexed"] == 2  # img001 and img002; img000 and img003 are inside
    assert summary["failed"] == [{"path": str(locked), "error": "folder cannot be read (Permission denied)"}]


def _without_root_override() -> list[str]:
    """The command prefix that makes file permissions bind: none for a normal user; for root,
    `setpriv` dropping the capabilities that let root read any file."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permissions cannot be made to bind")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_unreadable_folders_and_files_are_reported_by_a_real_run(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, 4, 0)
    locked = folder / "nested"
    locked.chmod(0)
    try:
        command = [*_without_root_override(), sys.executable, "-m", "bot.cli", "--data", str(tmp_path / "data"),
                   "index", str(folder), str(locked / "img000.jpg"), "--json"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ.copy())
    finally:
        locked.chmod(0o755)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["indexed"] == 2 and summary["failed"] == [
        {"path": str(locked), "error": "folder cannot be read (Permission denied)"},
        {"path": str(locked / "img000.jpg"), "error": "file cannot be read (permission denied)"},
    ]


def test_a_long_run_of_failures_is_listed_up_to_a_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    for number in range(53):
        (folder / f"note{number:02d}.jpg").write_text("not a picture")
    code, out = run_cli(capsys, "--data", str(tmp_path / "data"), "index", str(folder))
    lines = str(out).splitlines()
    assert code == 0 and lines[0].startswith("Indexed 0 new image(s)") and "53 failed" in lines[0]
    assert len(lines) == 52 and lines[-1] == "  ... and 3 more (all of them with --json)"
    code, summary = run_cli(capsys, "--data", str(tmp_path / "data"), "index", str(folder), "--json")
    assert len(summary["failed"]) == 53  # type: ignore[index]


def test_indexing_a_folder_again_forgets_the_files_gone_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = str(tmp_path / "data")
    folder = make_folder(tmp_path, good=6, broken=1)  # and notes.jpg, which is not a picture
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    (elsewhere / "kept.jpg").write_bytes(jpeg_bytes((9, 200, 9)))
    run_cli(capsys, "--data", data, "index", str(folder), str(elsewhere), "--json")
    code, before = run_cli(capsys, "--data", data, "search", "x", "--k", "25", "--json")
    ids = {Path(r["path"]).name: r["id"] for r in before}  # type: ignore[union-attr]
    (folder / "img001.jpg").unlink()
    (folder / "nested" / "img003.jpg").unlink()
    (folder / "img002.jpg").rename(folder / "nested" / "moved.jpg")
    assert run_cli(capsys, "--data", data, "stats", "--json")[1]["failures"] == 1  # type: ignore[index]
    (folder / "notes.jpg").unlink()
    code, summary = run_cli(capsys, "--data", data, "index", str(folder), "--json")
    assert run_cli(capsys, "--data", data, "stats", "--json")[1]["failures"] == 0  # type: ignore[index]
    assert code == 0 and summary["duplicates"] == 1  # type: ignore[index]
    assert sorted(Path(p).name for p in summary["forgotten"]) == ["img001.jpg", "img002.jpg", "img003.jpg"]  # type: ignore[index]
    code, after = run_cli(capsys, "--data", data, "search", "x", "--k", "25", "--json")
    found = {Path(r["path"]).name: r["id"] for r in after}  # type: ignore[union-attr]
    assert sorted(found) == ["img000.jpg", "img004.jpg", "img005.jpg", "kept.jpg", "moved.jpg"]
    assert found["moved.jpg"] == ids["img002.jpg"]  # a moved photo keeps its image, and its id
    # (kept.jpg is in another folder, which indexing this one leaves alone)
    assert run_cli(capsys, "--data", data, "verify")[0] == 0

    # A file behind a folder that may not be entered may still be there: it is kept.
    real_lstat = Path.lstat

    def lstat(self: Path) -> Any:
        if self.name == "img004.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return real_lstat(self)

    (folder / "img004.jpg").unlink()
    monkeypatch.setattr(Path, "lstat", lstat)
    code, summary = run_cli(capsys, "--data", data, "index", str(folder), "--json")
    assert summary["forgotten"] == []  # type: ignore[index]
