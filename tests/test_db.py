"""The catalog's schema: old databases are upgraded in place, and scoped listings use their index."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from store.db import MIGRATIONS, SCHEMA_VERSION, Catalog, DatabaseUnavailable, SourceFilter, open_connection
from tests.conftest import NOT_A_DATABASE, sqlite_threads, sqlite_threads_left


def _plan(path: Path, sql: str, params: list[object]) -> str:
    with sqlite3.connect(path) as conn:
        return " | ".join(row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


async def test_a_first_schema_database_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
        conn.execute(
            "INSERT INTO images (sha256, size_bytes, width, height, format, thumb, description, model_id, vector,"
            " created_at) VALUES ('abc', 1, 1, 1, 'JPEG', 't', 'a sandy beach', 'm', x'00', '2026-01-01T00:00:00+00:00')"
        )
        for source_id, channel, text in ((1, 70, "zanzibar trip"), (2, 71, "the secret offsite")):
            conn.execute(
                "INSERT INTO sources (image_id, kind, guild_id, channel_id, attachment_id, filename, posted_text,"
                " posted_at, added_at) VALUES (1, 'discord', 7, ?, ?, 'a.jpg', ?, '2026-01-01T00:00:00+00:00',"
                " '2026-01-01T00:00:00+00:00')",
                (channel, 700 + source_id, text),
            )
        # The first schema's full-text row: the description and every posted text, for the image.
        conn.execute("INSERT INTO images_fts (rowid, body) VALUES (1, 'a sandy beach\nzanzibar trip\nthe secret offsite')")
    catalog = await Catalog(path).open()
    seventy = SourceFilter(channel_ids=frozenset({70}), include_files=False)
    try:
        ids = await catalog.visible_image_ids(seventy)
        assert ids.tolist() == [1]
        none = await catalog.visible_image_ids(SourceFilter(channel_ids=frozenset({72}), include_files=False))
        assert none.tolist() == []
        # Text moved to one row per source: only what was posted where the filter reads matches.
        assert await catalog.text_matches("zanzibar", 5, seventy) == [1]
        assert await catalog.text_matches("beach", 5, seventy) == [1]
        assert await catalog.text_matches("offsite", 5, seventy) == []
        assert await catalog.posted_text_index_agrees()
    finally:
        await catalog.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert conn.execute("SELECT body FROM images_fts").fetchall() == [("a sandy beach",)]
    assert "sources_scope" in _indexes(path) and "sources_channel" not in _indexes(path)


async def test_descriptions_imported_for_files_become_the_files_own_text(tmp_path: Path) -> None:
    """Schema 3 kept an imported description on the image, shared with the same bytes posted on
    Discord; schema 4 moves it to the image's file sources, and leaves captions where they are."""
    path = tmp_path / "v3.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript("\n".join(MIGRATIONS[:3]) + "\nPRAGMA user_version = 3;")
        for image_id, description, origin in ((1, "grandma at the clinic", "import"), (2, "a red kite", "claude")):
            conn.execute(
                "INSERT INTO images (id, sha256, size_bytes, width, height, format, thumb, description,"
                " description_source, model_id, vector, created_at) VALUES (?, ?, 1, 1, 1, 'JPEG', 't', ?, ?, 'm',"
                " x'00', '2026-01-01T00:00:00+00:00')",
                (image_id, f"sha{image_id}", description, origin),
            )
            conn.execute("INSERT INTO images_fts (rowid, body) VALUES (?, ?)", (image_id, description))
        sources = ((1, "file", None, "/photos/g.jpg"), (1, "discord", 70, None), (2, "discord", 70, None))
        for number, (image_id, kind, channel, file_path) in enumerate(sources):
            conn.execute(
                "INSERT INTO sources (image_id, kind, path, guild_id, channel_id, attachment_id, filename, posted_at,"
                " added_at) VALUES (?, ?, ?, ?, ?, ?, 'a.jpg', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
                (image_id, kind, file_path, 7 if channel else None, channel, 700 + number if channel else None),
            )
    catalog = await Catalog(path).open()
    seventy = SourceFilter(channel_ids=frozenset({70}), include_files=False)
    try:
        assert await catalog.text_matches("grandma", 5, seventy) == []
        assert await catalog.text_matches("grandma", 5, SourceFilter()) == [1]
        assert await catalog.text_matches("kite", 5, seventy) == [2]
        assert await catalog.posted_text_index_agrees()
    finally:
        await catalog.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT id, description, description_source FROM images ORDER BY id").fetchall() == [
            (1, None, None), (2, "a red kite", "claude")]
        assert conn.execute("SELECT kind, posted_text FROM sources WHERE image_id = 1 ORDER BY kind").fetchall() == [
            ("discord", ""), ("file", "grandma at the clinic")]


async def test_listing_a_scope_reads_only_the_scope_index(tmp_path: Path) -> None:
    """The query every scoped search runs must not walk all sources or read their rows."""
    path = tmp_path / "new.sqlite3"
    await (await Catalog(path).open()).close()
    for flt in (
        SourceFilter(channel_ids=frozenset({1, 2, 3}), include_files=False),
        SourceFilter(channel_ids=frozenset({1, 2}), guild_ids=frozenset({9}), include_files=False),
    ):
        where, params = flt.where("s")
        plan = _plan(path, f"SELECT DISTINCT s.image_id FROM sources s WHERE {where} ORDER BY s.image_id", params)
        assert "COVERING INDEX sources_scope" in plan, plan


async def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = sqlite_threads()
    with pytest.raises(DatabaseUnavailable, match="newer Shoebox") as refused:
        await Catalog(path).open()
    # Checked while the error (and the frames it holds) is alive, as it is while a command reports it.
    assert not sqlite_threads_left(before), refused.value


async def test_a_file_that_is_not_a_database_is_refused_and_no_connection_stays_open(tmp_path: Path) -> None:
    path = tmp_path / "shoebox.sqlite3"
    path.write_bytes(NOT_A_DATABASE)
    before = sqlite_threads()
    with pytest.raises(DatabaseUnavailable, match=r"shoebox.sqlite3 cannot be opened as a database \(file is not a database\)") as refused:
        await Catalog(path).open()
    # Checked while the error (and the frames it holds) is alive, as it is while a command reports it.
    assert not sqlite_threads_left(before), refused.value
    assert path.read_bytes() == NOT_A_DATABASE  # refused, not overwritten


async def test_a_database_path_that_cannot_be_opened_at_all_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "shoebox.sqlite3"
    path.mkdir()  # a folder where the file should be
    with pytest.raises(DatabaseUnavailable, match=r"shoebox.sqlite3 cannot be opened for writing \(unable to open"):
        await Catalog(path).open()


async def test_a_database_that_cannot_be_written_is_not_called_damaged(tmp_path: Path) -> None:
    """Access problems get advice about the folder, never the advice to restore or move the file."""
    path = tmp_path / "missing-folder" / "shoebox.sqlite3"
    with pytest.raises(DatabaseUnavailable) as refused:
        await open_connection(path)
    assert "cannot be opened for writing" in str(refused.value) and "--data" in str(refused.value)
    assert "damaged" not in str(refused.value) and "backup" not in str(refused.value)


def test_a_path_sqlite_cannot_open_leaves_no_thread_to_fail_after_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal ends its event loop at once, as a command does; no connection thread may be
    left to report to that closed loop (it used to, in about one run in twelve)."""
    path = tmp_path / "shoebox.sqlite3"
    path.mkdir()
    failures: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: failures.append(args.exc_value))
    before = sqlite_threads()
    for _ in range(100):
        with pytest.raises(DatabaseUnavailable):
            asyncio.run(Catalog(path).open())
    assert not sqlite_threads_left(before)
    assert failures == []


async def test_visible_among_checks_every_candidate_against_the_filter(tmp_path: Path) -> None:
    path = tmp_path / "many.sqlite3"
    catalog = await Catalog(path).open()
    await catalog.close()
    with sqlite3.connect(path) as conn:
        for image_id in range(1, 1201):
            conn.execute(
                "INSERT INTO images (id, sha256, size_bytes, width, height, format, thumb, model_id, vector, created_at)"
                " VALUES (?, ?, 1, 1, 1, 'JPEG', 't', 'm', x'00', '2026-01-01T00:00:00+00:00')",
                (image_id, f"{image_id:064x}"),
            )
            conn.execute(
                "INSERT INTO sources (image_id, kind, guild_id, channel_id, attachment_id, filename, posted_at, added_at)"
                " VALUES (?, 'discord', 7, ?, ?, 'a.jpg', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')",
                (image_id, 70 + image_id % 3, image_id),
            )
        # One photo also posted where the filter reads: one visible source is enough.
        conn.execute(
            "INSERT INTO sources (image_id, kind, guild_id, channel_id, attachment_id, filename, posted_at, added_at)"
            " VALUES (2, 'discord', 7, 70, 99999, 'a.jpg', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')"
        )
    catalog = await Catalog(path).open()
    try:
        readable = SourceFilter(channel_ids=frozenset({70, 71}), include_files=False)
        candidates = [*range(1200, 0, -1), 5000]  # more than one query's worth, and an id with no row
        visible = await catalog.visible_among(readable, candidates)
        assert visible == {i for i in range(1, 1201) if i % 3 != 2} | {2}
        assert visible == set((await catalog.visible_image_ids(readable)).tolist())
        assert await catalog.visible_among(SourceFilter(channel_ids=frozenset(), include_files=False), candidates) == set()
    finally:
        await catalog.close()
