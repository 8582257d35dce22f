"""The SQLite catalog: the source of truth for every image, its sources, descriptions and vector.

One row per distinct image (deduplicated by sha256), one row per place it was seen (a file path or
a Discord attachment). The FAISS index is derived from these rows and can always be rebuilt, so
every write here happens in one transaction and bumps `generation`, which tells the vector index
whether it is behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Iterator, Sequence, TypeVar

import aiosqlite
import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 4

# Each entry upgrades the schema from version i to i + 1. Append; never edit a released step.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE images (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        sha256 TEXT NOT NULL UNIQUE,
        size_bytes INTEGER NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        format TEXT NOT NULL,
        thumb TEXT NOT NULL,
        description TEXT,
        description_source TEXT,
        caption_attempts INTEGER NOT NULL DEFAULT 0,
        model_id TEXT NOT NULL,
        vector BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE sources (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('file', 'discord')),
        path TEXT,
        guild_id INTEGER,
        channel_id INTEGER,
        message_id INTEGER,
        attachment_id INTEGER,
        author_id INTEGER,
        author_name TEXT,
        channel_name TEXT,
        filename TEXT NOT NULL,
        posted_text TEXT NOT NULL DEFAULT '',
        posted_at TEXT NOT NULL,
        added_at TEXT NOT NULL,
        UNIQUE (kind, path),
        UNIQUE (kind, attachment_id)
    );
    CREATE INDEX sources_image ON sources (image_id);
    CREATE INDEX sources_channel ON sources (channel_id);
    CREATE INDEX sources_guild ON sources (guild_id);
    CREATE INDEX sources_message ON sources (message_id);
    CREATE INDEX sources_posted ON sources (posted_at);
    CREATE VIRTUAL TABLE images_fts USING fts5 (body, tokenize = 'unicode61 remove_diacritics 2');
    CREATE TABLE failures (
        source_key TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE staged_vectors (
        image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
        model_id TEXT NOT NULL,
        vector BLOB NOT NULL
    );
    """,
    # Every scoped search lists the images in the asker's channels. With only (channel_id)
    # indexed, SQLite walked every Discord source through the (kind, attachment_id) index and read
    # each row (18 ms for 10k visible images out of 100k); this index answers it on its own (4 ms)
    # and serves every lookup by channel that the old one did.
    """
    DROP INDEX sources_channel;
    CREATE INDEX sources_scope ON sources (channel_id, kind, guild_id, image_id);
    """,
    # Posted text is searchable per source, so a search matches only the words posted where the
    # asker can read: identical bytes posted in a public and a private channel are one image, and
    # an image-wide text would let the private words find (and rank) the public post. Triggers
    # keep it in step with `sources`, including rows removed by a cascade. The image's own row
    # keeps only its description, which comes from the pixels and is the same wherever posted.
    """
    CREATE VIRTUAL TABLE sources_fts USING fts5 (
        posted_text, content = 'sources', content_rowid = 'id', tokenize = 'unicode61 remove_diacritics 2'
    );
    INSERT INTO sources_fts (sources_fts) VALUES ('rebuild');
    CREATE TRIGGER sources_fts_insert AFTER INSERT ON sources BEGIN
        INSERT INTO sources_fts (rowid, posted_text) VALUES (new.id, new.posted_text);
    END;
    CREATE TRIGGER sources_fts_delete AFTER DELETE ON sources BEGIN
        INSERT INTO sources_fts (sources_fts, rowid, posted_text) VALUES ('delete', old.id, old.posted_text);
    END;
    CREATE TRIGGER sources_fts_update AFTER UPDATE OF posted_text ON sources BEGIN
        INSERT INTO sources_fts (sources_fts, rowid, posted_text) VALUES ('delete', old.id, old.posted_text);
        INSERT INTO sources_fts (rowid, posted_text) VALUES (new.id, new.posted_text);
    END;
    DELETE FROM images_fts;
    INSERT INTO images_fts (rowid, body) SELECT id, description FROM images WHERE coalesce(description, '') != '';
    """,
    # A description imported for a local file is the operator's words about that file, not what
    # the pixels show: it becomes the file's own text, searched and shown with that source only,
    # so the same bytes posted on Discord do not carry it there.
    """
    UPDATE sources SET posted_text = (SELECT i.description FROM images i WHERE i.id = sources.image_id)
        WHERE kind = 'file' AND posted_text = '' AND image_id IN
            (SELECT id FROM images WHERE description_source = 'import' AND coalesce(description, '') != '');
    DELETE FROM images_fts WHERE rowid IN (SELECT id FROM images WHERE description_source = 'import');
    UPDATE images SET description = NULL, description_source = NULL WHERE description_source = 'import';
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION


async def first_row(conn: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> Any | None:
    """The first row of a query, in one trip to the connection's thread (a cursor's execute,
    fetch and close would be three, about 70 us of CPU each, several per indexed image)."""
    rows = await conn.execute_fetchall(sql, params)
    return next(iter(rows), None)


def utc_now() -> str:
    return to_iso(datetime.now(timezone.utc))


def to_iso(moment: datetime) -> str:
    """UTC, second precision, fixed width: stored times sort correctly as plain text."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


@dataclass(frozen=True)
class SourceRecord:
    """Where an image was seen. File sources carry `path`; Discord sources carry the ids."""

    kind: str
    filename: str
    posted_at: str
    path: str | None = None
    guild_id: int | None = None
    channel_id: int | None = None
    message_id: int | None = None
    attachment_id: int | None = None
    author_id: int | None = None
    author_name: str | None = None
    channel_name: str | None = None
    posted_text: str = ""
    id: int | None = None
    image_id: int | None = None

    @property
    def key(self) -> str:
        """A stable name for this source, used to record failures and find re-posts."""
        if self.kind == "file":
            return f"file:{self.path}"
        return f"discord:{self.attachment_id}"


@dataclass(frozen=True)
class ImageRecord:
    id: int
    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str
    thumb: str
    description: str | None
    description_source: str | None
    model_id: str
    created_at: str


@dataclass(frozen=True)
class NewImage:
    """Everything needed to insert a freshly embedded image in one go."""

    sha256: str
    size_bytes: int
    width: int
    height: int
    format: str
    thumb: str
    model_id: str
    vector: np.ndarray
    source: SourceRecord
    description: str | None = None
    description_source: str | None = None


_SOURCE_COLUMNS = (
    "kind, filename, posted_at, path, guild_id, channel_id, message_id, attachment_id, "
    "author_id, author_name, channel_name, posted_text, id, image_id"
)


def _key_of(source: SourceRecord) -> tuple[str, str, object]:
    """(kind, column, value) that identify where `source` was seen: its file path or attachment."""
    if source.kind == "file":
        return "file", "path", source.path
    return "discord", "attachment_id", source.attachment_id


_SOURCE_COLUMNS_OF_S = ", ".join(f"s.{column.strip()}" for column in _SOURCE_COLUMNS.split(","))
# Values per `IN (...)` list: far below SQLite's limit on bound parameters.
_IN_CHUNK = 500


def in_chunks(values: Iterable[T]) -> Iterator[tuple[list[T], str]]:
    """The values a chunk at a time, each with the `?, ?, ...` of its `IN (...)` list: a long list
    of ids bound at once would pass SQLite's limit on parameters."""
    listed = list(values)
    for start in range(0, len(listed), _IN_CHUNK):
        chunk = listed[start : start + _IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))

_INSERT_IMAGE = (
    "INSERT INTO images (sha256, size_bytes, width, height, format, thumb, description, "
    "description_source, model_id, vector, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SOURCE = (
    "INSERT INTO sources (image_id, kind, path, guild_id, channel_id, message_id, attachment_id, "
    "author_id, author_name, channel_name, filename, posted_text, posted_at, added_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Full-text matching (see `Catalog.text_matches`), per table: the newest matches in the filter,
# each with its image and its bm25 (FTS5's `rank`); parameters: the match, the filter's, how many.
RANKED_TEXT_MATCHES = 2000
_RANKED_TEXT = (
    "SELECT s.image_id, t.rank FROM sources_fts t JOIN sources s ON s.id = t.rowid"
    " WHERE sources_fts MATCH ? AND {where} ORDER BY t.rowid DESC LIMIT ?",
    "SELECT f.rowid, f.rank FROM images_fts f WHERE images_fts MATCH ?"
    " AND EXISTS (SELECT 1 FROM sources s WHERE s.image_id = f.rowid AND {where})"
    " ORDER BY f.rowid DESC LIMIT ?",
)
_SET_TEXT = "INSERT OR REPLACE INTO images_fts (rowid, body) VALUES (?, ?)"
_DELETE_TEXT = "DELETE FROM images_fts WHERE rowid = ?"


def _image_row(new: NewImage) -> tuple[object, ...]:
    """`new` as the parameters of `_INSERT_IMAGE`."""
    return (
        new.sha256,
        new.size_bytes,
        new.width,
        new.height,
        new.format,
        new.thumb,
        new.description,
        new.description_source,
        new.model_id,
        vector_to_blob(new.vector),
        utc_now(),
    )


def _source_row(image_id: int, src: SourceRecord) -> tuple[object, ...]:
    """`src`, seen for image `image_id`, as the parameters of `_INSERT_SOURCE`."""
    return (
        image_id,
        src.kind,
        src.path,
        src.guild_id,
        src.channel_id,
        src.message_id,
        src.attachment_id,
        src.author_id,
        src.author_name,
        src.channel_name,
        src.filename,
        src.posted_text,
        src.posted_at,
        utc_now(),
    )


_IMAGE_COLUMNS = (
    "id, sha256, size_bytes, width, height, format, thumb, description, description_source, "
    "model_id, created_at"
)


def _source_from_row(row: Sequence[object]) -> SourceRecord:
    return SourceRecord(*row)  # type: ignore[arg-type]


def _image_from_row(row: Sequence[object]) -> ImageRecord:
    return ImageRecord(*row)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SourceFilter:
    """Which sources a query may see: the asker's scope plus the filters they asked for.

    `channel_ids=None` means every Discord channel; `include_files` says whether local-file
    sources are visible (the terminal sees them; a Discord member never does).
    """

    channel_ids: frozenset[int] | None = None
    guild_ids: frozenset[int] | None = None
    include_files: bool = True
    include_discord: bool = True
    author: str | None = None
    channel: str | None = None
    after: str | None = None
    before: str | None = None

    @property
    def unrestricted(self) -> bool:
        return (
            self.channel_ids is None
            and self.guild_ids is None
            and self.include_files
            and self.include_discord
            and not (self.author or self.channel or self.after or self.before)
        )

    def where(self, alias: str = "s") -> tuple[str, list[object]]:
        """A SQL condition over `sources` (aliased) and its parameters."""
        clauses: list[str] = []
        params: list[object] = []
        kinds = []
        if self.include_files:
            kinds.append(f"{alias}.kind = 'file'")
        if self.include_discord:
            discord = [f"{alias}.kind = 'discord'"]
            for column, allowed in (("channel_id", self.channel_ids), ("guild_id", self.guild_ids)):
                if allowed is not None:
                    ids = sorted(allowed)
                    # An empty allowed set matches nothing ("0"), never everything.
                    discord.append(f"{alias}.{column} IN ({','.join('?' * len(ids))})" if ids else "0")
                    params.extend(ids)
            kinds.append("(" + " AND ".join(discord) + ")")
        clauses.append("(" + (" OR ".join(kinds) if kinds else "0") + ")")
        for value, sigil, column in ((self.author, "@", "author"), (self.channel, "#", "channel")):
            if value:
                name = value.lstrip(sigil)
                if name.isdigit():  # a Discord id
                    clauses.append(f"{alias}.{column}_id = ?")
                    params.append(int(name))
                else:
                    clauses.append(f"lower({alias}.{column}_name) = lower(?)")
                    params.append(name)
        if self.after:
            clauses.append(f"{alias}.posted_at >= ?")
            params.append(self.after)
        if self.before:
            clauses.append(f"{alias}.posted_at < ?")
            params.append(self.before)
        return " AND ".join(clauses), params


_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it of on or that the this to was with "
    "photo photos picture pictures image images pic pics".split()
)


def fts_query(text: str) -> str | None:
    """Turn free text into a safe FTS5 query: quoted words, OR-ed, stopwords dropped."""
    words = []
    for raw in text.lower().replace('"', " ").split():
        word = "".join(ch for ch in raw if ch.isalnum() or ch in "-_'")
        word = word.strip("-_'")
        if word and word not in _STOPWORDS and word not in words:
            words.append(word)
    if not words:
        return None
    return " OR ".join(f'"{word}"' for word in words[:16])


class DatabaseUnavailable(RuntimeError):
    """A database file Shoebox cannot use: damaged, not a database at all, from a newer version,
    or in a folder it cannot create or write.

    The message is for the person running Shoebox: which file, what is wrong with it, what to do.
    """


async def open_connection(path: Path, *, foreign_keys: bool = False) -> aiosqlite.Connection:
    """An autocommit connection to `path` in WAL mode, waiting up to 30 s for other writers.

    A connection's thread keeps the process from exiting until the connection is closed, so one
    that fails to set up (the file is damaged, or not a database) is closed before the error is
    raised: a command that cannot open its database says so and exits instead of hanging.
    """
    try:
        # Tried on a plain thread first: when SQLite cannot open the path at all, aiosqlite stops
        # its connection thread without waiting for it, and that thread then reports to an event
        # loop that may be closed by then (a traceback after the one-line error).
        await asyncio.to_thread(_open_and_close, path)
        conn = await aiosqlite.connect(path, isolation_level=None)
    except sqlite3.DatabaseError as error:
        raise _unusable(path, error) from error
    try:
        await conn.execute("PRAGMA busy_timeout = 30000")
        await _enter_wal(conn)
        await conn.execute("PRAGMA synchronous = NORMAL")
        if foreign_keys:
            await conn.execute("PRAGMA foreign_keys = ON")
    except BaseException as error:
        await conn.close()
        if isinstance(error, sqlite3.DatabaseError):
            raise _unusable(path, error) from error
        raise
    return conn


def sql_statements(script: str) -> list[str]:
    """The statements of a script, one by one (a trigger's body stays whole)."""
    statements: list[str] = []
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\n;"):
        statements.append(pending.strip())  # unterminated: SQLite will say what is wrong with it
    return statements


async def _user_version(conn: aiosqlite.Connection) -> int:
    row = await first_row(conn, "PRAGMA user_version")
    return int(row[0]) if row else 0


async def apply_migrations(conn: aiosqlite.Connection, path: Path, migrations: Sequence[str]) -> None:
    """Bring the schema of the database at `path` (autocommit `conn`) up to `len(migrations)`.

    Each step is one transaction that reads the version under the write lock first: two
    processes opening an older file at once (the bot, and the CLI beside it) take turns, and the
    second finds the step done instead of running it again.
    """
    target = len(migrations)
    if await _user_version(conn) == target:
        return  # the usual case, without taking the write lock
    while True:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            version = await _user_version(conn)
            if version > target:
                raise DatabaseUnavailable(
                    f"{path} was written by a newer Shoebox (schema {version}, this one knows "
                    f"{target}); upgrade Shoebox to open it."
                )
            if version == target:
                await conn.execute("COMMIT")
                return
            log.info("Migrating %s to schema %d", path, version + 1)
            for statement in sql_statements(migrations[version]):
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {version + 1}")
            await conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
                await conn.execute("ROLLBACK")
            raise


async def _enter_wal(conn: aiosqlite.Connection, patience: float = 30.0) -> None:
    """Switch to WAL, waiting for other openers as long as for any writer.

    The switch needs the file to itself, and SQLite answers "database is locked" at once, without
    waiting (busy_timeout does not apply), while another process is setting up a new file: the
    bot and the CLI started together on a new data folder.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            if getattr(error, "sqlite_errorname", "") != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)


def _open_and_close(path: Path) -> None:
    sqlite3.connect(path).close()


# SQLite's codes for a file it may not open or write (as opposed to one whose content is wrong).
_ACCESS_ERRORS = frozenset({"SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH"})


def _unusable(path: Path, error: sqlite3.DatabaseError) -> DatabaseUnavailable:
    """The error for a database Shoebox cannot use: access (fix the folder) or content (restore)."""
    code = getattr(error, "sqlite_errorname", "") or ""
    if code.startswith(tuple(_ACCESS_ERRORS)):
        return DatabaseUnavailable(
            f"{path} cannot be opened for writing ({error}): it must be a file, or not exist yet, in "
            "a folder Shoebox may write to (another data folder: --data or SHOEBOX_DATA)."
        )
    return DatabaseUnavailable(
        f"{path} cannot be opened as a database ({error}). If it was damaged, restore it from a "
        "backup; moving it aside makes Shoebox start a new, empty one."
    )


class Catalog:
    """Async access to the SQLite catalog.

    Two connections: one serialised writer (an asyncio lock around each transaction, so concurrent
    tasks never interleave statements inside one transaction) and one reader (WAL lets it read while
    the writer writes). `busy_timeout` covers other processes using the same file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    async def open(self) -> "Catalog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        try:
            await self._migrate()
            self._reader = await self._connect()
        except BaseException:
            await self.close()  # a refused or failed upgrade must not leave a connection open
            raise
        return self

    async def _connect(self) -> aiosqlite.Connection:
        return await open_connection(self.path, foreign_keys=True)

    async def close(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None

    @property
    def reader(self) -> aiosqlite.Connection:
        assert self._reader is not None, "catalog is not open"
        return self._reader

    async def _migrate(self) -> None:
        assert self._writer is not None
        await apply_migrations(self._writer, self.path, MIGRATIONS)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; rolls back on any error so a half-write never lands."""
        assert self._writer is not None, "catalog is not open"
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                await self._writer.execute("ROLLBACK")
                raise
            else:
                await self._writer.execute("COMMIT")

    # ---- meta -------------------------------------------------------------------------------

    async def get_meta(self, key: str) -> str | None:
        async with self.reader.execute("SELECT value FROM meta WHERE key = ?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    async def set_meta(conn: aiosqlite.Connection, key: str, value: str) -> None:
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    @staticmethod
    async def bump_generation(conn: aiosqlite.Connection) -> int:
        """Count a change to the images inside the open transaction; returns the generation it
        makes, which is this change's own (the write lock is held until the commit)."""
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('generation', '1') "
            "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )
        row = await first_row(conn, "SELECT value FROM meta WHERE key = 'generation'")
        return int(row[0]) if row else 0

    async def generation(self) -> int:
        value = await self.get_meta("generation")
        return int(value) if value else 0

    # ---- reads ------------------------------------------------------------------------------

    async def source_for_key(self, source: SourceRecord) -> SourceRecord | None:
        """The stored source for the same file path or attachment."""
        stored, _ = await self.source_and_sha_for_key(self.reader, source)
        return stored

    @staticmethod
    async def source_and_sha_for_key(
        conn: aiosqlite.Connection, source: SourceRecord
    ) -> tuple[SourceRecord | None, str | None]:
        """The stored source for the same file path or attachment, read through `conn` (inside
        its transaction, when committing), with the sha256 of that source's image (None if the
        image row is missing), in one query."""
        kind, column, value = _key_of(source)
        row = await first_row(
            conn,
            f"SELECT {_SOURCE_COLUMNS_OF_S}, i.sha256 FROM sources s LEFT JOIN images i ON i.id = s.image_id "
            f"WHERE s.kind = ? AND s.{column} = ?",
            (kind, value),
        )
        if row is None:
            return None, None
        return _source_from_row(row[:-1]), (None if row[-1] is None else str(row[-1]))

    async def sources_with_sha(self, sources: Sequence[SourceRecord]) -> dict[str, tuple[SourceRecord, str]]:
        """For each source already stored (same file path or attachment), the stored record and
        the sha256 of its image, keyed by `SourceRecord.key`: a batch's worth in a few queries."""
        found: dict[str, tuple[SourceRecord, str]] = {}
        by_key: dict[tuple[str, str], list[object]] = {}
        for source in sources:
            kind, column, value = _key_of(source)
            by_key.setdefault((kind, column), []).append(value)
        for (kind, column), values in by_key.items():
            for chunk, marks in in_chunks(values):
                rows = await self.reader.execute_fetchall(
                    f"SELECT {_SOURCE_COLUMNS_OF_S}, i.sha256 FROM sources s JOIN images i ON i.id = s.image_id "
                    f"WHERE s.kind = ? AND s.{column} IN ({marks})",
                    [kind, *chunk],
                )
                for row in rows:
                    record = _source_from_row(row[:-1])
                    found[record.key] = (record, str(row[-1]))
        return found

    async def stored_copies(self, shas: Sequence[str]) -> dict[str, str]:
        """The stored copy (path relative to the data folder) of each of these sha256s that is
        already stored."""
        known: dict[str, str] = {}
        for chunk, marks in in_chunks(shas):
            rows = await self.reader.execute_fetchall(f"SELECT sha256, thumb FROM images WHERE sha256 IN ({marks})", chunk)
            known.update((str(sha), str(thumb)) for sha, thumb in rows)
        return known

    async def get_image(self, image_id: int) -> ImageRecord | None:
        row = await first_row(self.reader, f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?", (image_id,))
        return None if row is None else _image_from_row(row)

    async def get_images(self, image_ids: Iterable[int]) -> dict[int, ImageRecord]:
        ids = list(dict.fromkeys(int(i) for i in image_ids))
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        async with self.reader.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id IN ({marks})", ids
        ) as cur:
            rows = await cur.fetchall()
        return {int(row[0]): _image_from_row(row) for row in rows}

    async def sources_of(
        self, image_ids: Iterable[int], flt: SourceFilter | None = None
    ) -> dict[int, list[SourceRecord]]:
        """Visible sources of each image, oldest post first."""
        ids = list(dict.fromkeys(int(i) for i in image_ids))
        if not ids:
            return {}
        where, params = (flt or SourceFilter()).where("s")
        marks = ",".join("?" * len(ids))
        sql = (
            f"SELECT {', '.join('s.' + c.strip() for c in _SOURCE_COLUMNS.split(','))} "
            # INDEXED BY: left alone, SQLite may walk the posted_at index to avoid sorting and
            # scan every source (18 ms at 100k sources) instead of looking up these few images.
            f"FROM sources s INDEXED BY sources_image WHERE s.image_id IN ({marks}) AND {where} "
            "ORDER BY s.posted_at, s.id"
        )
        result: dict[int, list[SourceRecord]] = {}
        async with self.reader.execute(sql, [*ids, *params]) as cur:
            async for row in cur:
                record = _source_from_row(row)
                result.setdefault(int(record.image_id or 0), []).append(record)
        return result

    async def visible_image_ids(self, flt: SourceFilter) -> np.ndarray:
        """Ids of images with at least one source the filter lets through (int64, sorted)."""
        where, params = flt.where("s")
        sql = f"SELECT DISTINCT s.image_id FROM sources s WHERE {where} ORDER BY s.image_id"
        async with self.reader.execute(sql, params) as cur:
            rows = await cur.fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    async def visible_among(self, flt: SourceFilter, image_ids: Sequence[int]) -> set[int]:
        """Which of these images have at least one source the filter lets through.

        The check a wide scope's search makes on its best candidates, in place of listing every
        image the scope allows (a million ids at a million images).
        """
        where, params = flt.where("s")
        visible: set[int] = set()
        ids = [int(i) for i in image_ids]
        for chunk, marks in in_chunks(ids):
            sql = (
                "SELECT DISTINCT s.image_id FROM sources s INDEXED BY sources_image "
                f"WHERE s.image_id IN ({marks}) AND {where}"
            )
            visible.update(int(row[0]) for row in await self.reader.execute_fetchall(sql, [*chunk, *params]))
        return visible

    async def image_ids_and_generation(self) -> tuple[np.ndarray, int]:
        """Every image id and the generation they are at, read in one statement, so both come
        from the same snapshot: a commit landing between two reads would be counted in one and
        not the other."""
        async with self.reader.execute(
            "SELECT 0, CAST(value AS INTEGER) FROM meta WHERE key = 'generation' "
            "UNION ALL SELECT 1, id FROM images"
        ) as cur:
            rows = await cur.fetchall()
        generation = next((int(value) for kind, value in rows if kind == 0), 0)
        ids = np.fromiter((value for kind, value in rows if kind == 1), dtype=np.int64)
        return np.sort(ids), generation

    async def all_image_ids(self) -> np.ndarray:
        async with self.reader.execute("SELECT id FROM images ORDER BY id") as cur:
            rows = await cur.fetchall()
        return np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))

    async def vectors_for(self, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given images that exist, in chunks to bound SQL parameters."""
        found_ids: list[int] = []
        vectors: list[np.ndarray] = []
        for chunk, marks in in_chunks(int(i) for i in image_ids):
            async with self.reader.execute(
                f"SELECT id, vector FROM images WHERE id IN ({marks})", chunk
            ) as cur:
                async for row in cur:
                    found_ids.append(int(row[0]))
                    vectors.append(blob_to_vector(row[1]))
        if not vectors:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(found_ids, dtype=np.int64), np.stack(vectors)

    async def iter_vectors(self, batch: int = 10_000) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors) in id order, a batch at a time, for rebuilding the vector index."""
        last = -1
        while True:
            async with self.reader.execute(
                "SELECT id, vector FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ) as cur:
                rows = await cur.fetchall()
            if not rows:
                return
            last = int(rows[-1][0])
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            yield ids, np.stack([blob_to_vector(r[1]) for r in rows])

    async def text_matches(self, query: str, limit: int, flt: SourceFilter) -> list[int]:
        """Image ids whose description, or text posted with them where `flt` lets through,
        matches; best first (bm25, summed over an image's matching rows).

        Posted text is matched per source, each under the filter: a word posted with the same
        photo somewhere the asker cannot read must neither find it nor lift its rank.

        bm25 is computed for every row it orders, about 1.3 us each: a common word in a million
        posts matches ten thousand of them, which took 35 ms. So each table ranks only its
        `RANKED_TEXT_MATCHES` most recently indexed matches in the filter: FTS5 walks the matches
        newest first, and bm25 is computed only for the rows that pass the filter before the
        limit. (Finding the oldest of them first and ranking from there walked the matches twice:
        23 ms against 13 ms in a 5-of-50-channel scope at 1M posts.) Search fuses this list with
        the CLIP ranking, which covers everything.
        """
        match = fts_query(query)
        if match is None:
            return []
        where, params = flt.where("s")
        scores: dict[int, float] = {}
        for ranked in _RANKED_TEXT:
            for image_id, score in await self.reader.execute_fetchall(
                ranked.format(where=where), [match, *params, RANKED_TEXT_MATCHES]
            ):
                scores[int(image_id)] = scores.get(int(image_id), 0.0) + float(score)
        return sorted(scores, key=scores.__getitem__)[:limit]

    async def posted_text_index_agrees(self) -> bool:
        """FTS5's own check of the per-source text index against the `sources` rows."""
        try:
            # An INSERT in form, so it runs on the writer, like any statement that might write.
            async with self.transaction() as conn:
                await conn.execute("INSERT INTO sources_fts (sources_fts, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError:
            return False
        return True

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, sql in (
            ("images", "SELECT COUNT(*) FROM images"),
            ("sources", "SELECT COUNT(*) FROM sources"),
            ("described", "SELECT COUNT(*) FROM images WHERE description IS NOT NULL"),
            ("failures", "SELECT COUNT(*) FROM failures"),
        ):
            async with self.reader.execute(sql) as cur:
                row = await cur.fetchone()
            out[name] = int(row[0]) if row else 0
        return out

    async def recent_failures(self, limit: int = 10) -> list[tuple[str, str, str]]:
        async with self.reader.execute(
            "SELECT source_key, reason, at FROM failures ORDER BY at DESC LIMIT ?", (limit,)
        ) as cur:
            rows = await cur.fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    async def models_in_use(self) -> dict[str, int]:
        async with self.reader.execute(
            "SELECT model_id, COUNT(*) FROM images GROUP BY model_id"
        ) as cur:
            rows = await cur.fetchall()
        return {str(m): int(n) for m, n in rows}

    async def uncaptioned(self, limit: int, max_attempts: int) -> list[ImageRecord]:
        async with self.reader.execute(
            f"SELECT {_IMAGE_COLUMNS} FROM images WHERE description IS NULL "
            "AND caption_attempts < ? ORDER BY id LIMIT ?",
            (max_attempts, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [_image_from_row(r) for r in rows]

    async def all_thumbs(self) -> set[str]:
        async with self.reader.execute("SELECT thumb FROM images") as cur:
            rows = await cur.fetchall()
        return {str(r[0]) for r in rows}

    async def sources_for_messages(self, message_ids: Iterable[int]) -> list[SourceRecord]:
        out: list[SourceRecord] = []
        for chunk, marks in in_chunks(int(i) for i in message_ids):
            async with self.reader.execute(
                f"SELECT {_SOURCE_COLUMNS} FROM sources WHERE kind = 'discord' "
                f"AND message_id IN ({marks})",
                chunk,
            ) as cur:
                out.extend(_source_from_row(r) for r in await cur.fetchall())
        return out

    async def file_sources_under(self, folder: str) -> list[SourceRecord]:
        """The `file` sources whose path lies inside `folder` (an absolute path), at any depth."""
        prefix = folder.rstrip(os.sep) + os.sep
        async with self.reader.execute(
            f"SELECT {_SOURCE_COLUMNS} FROM sources WHERE kind = 'file' AND substr(path, 1, ?) = ?",
            (len(prefix), prefix),
        ) as cur:
            return [_source_from_row(r) for r in await cur.fetchall()]

    async def file_failures_under(self, folder: str) -> list[str]:
        """The source keys of recorded failures of files inside `folder` (an absolute path)."""
        prefix = "file:" + folder.rstrip(os.sep) + os.sep
        async with self.reader.execute(
            "SELECT source_key FROM failures WHERE substr(source_key, 1, ?) = ?", (len(prefix), prefix)
        ) as cur:
            return [str(row[0]) for row in await cur.fetchall()]

    async def find_sources(self, column: str, value: int) -> list[SourceRecord]:
        if column not in {"channel_id", "guild_id", "image_id", "author_id"}:
            raise ValueError(f"cannot look sources up by {column}")
        async with self.reader.execute(
            f"SELECT {_SOURCE_COLUMNS} FROM sources WHERE {column} = ?", (value,)
        ) as cur:
            return [_source_from_row(r) for r in await cur.fetchall()]

    # ---- writes (each takes the open transaction's connection) -------------------------------

    @staticmethod
    async def insert_source(conn: aiosqlite.Connection, image_id: int, src: SourceRecord) -> int:
        cur = await conn.execute(_INSERT_SOURCE, _source_row(image_id, src))
        return int(cur.lastrowid or 0)

    @staticmethod
    async def insert_image(conn: aiosqlite.Connection, new: NewImage) -> int:
        cur = await conn.execute(_INSERT_IMAGE, _image_row(new))
        return int(cur.lastrowid or 0)

    @staticmethod
    async def insert_new_images(conn: aiosqlite.Connection, news: Sequence[NewImage]) -> list[int]:
        """Insert images that are all new, each with its first source and its searchable text,
        in a few statements for the lot; returns their ids in order.

        A batch of a backfill costs four or five trips to the connection's thread this way
        instead of three per image (each trip wakes two threads). Raises sqlite3.IntegrityError, having
        written part of the batch, when any image or source is already stored: the caller runs
        this inside a savepoint and falls back to storing the images one by one.
        """
        if not news:
            return []
        await conn.executemany(_INSERT_IMAGE, [_image_row(new) for new in news])
        shas = [new.sha256 for new in news]
        ids: dict[str, int] = {}
        for chunk, marks in in_chunks(shas):
            rows = await conn.execute_fetchall(f"SELECT sha256, id FROM images WHERE sha256 IN ({marks})", chunk)
            ids.update((str(sha), int(image_id)) for sha, image_id in rows)
        image_ids = [ids[sha] for sha in shas]
        await conn.executemany(_INSERT_SOURCE, [_source_row(i, new.source) for i, new in zip(image_ids, news)])
        described = [(i, new.description) for i, new in zip(image_ids, news) if new.description]
        if described:
            await conn.executemany(_SET_TEXT, described)
        return image_ids

    @staticmethod
    async def set_searchable_description(conn: aiosqlite.Connection, image_id: int, description: str | None) -> None:
        """Make the image findable by its description (posted texts are kept per source, by the
        triggers on `sources`)."""
        if description:
            await conn.execute(_SET_TEXT, (image_id, description))
        else:
            await conn.execute(_DELETE_TEXT, (image_id,))

    @staticmethod
    async def set_source_text(conn: aiosqlite.Connection, source_id: int, text: str) -> bool:
        """Give one source its own words (searched and shown with that source only)."""
        cur = await conn.execute("UPDATE sources SET posted_text = ? WHERE id = ?", (text, source_id))
        return bool(cur.rowcount)

    @staticmethod
    async def set_posted_text(conn: aiosqlite.Connection, message_id: int, text: str) -> int:
        """A message's text was edited: its sources now carry (and are found by) the new text.
        Returns how many sources changed."""
        cur = await conn.execute(
            "UPDATE sources SET posted_text = ? WHERE message_id = ? AND posted_text != ?", (text, message_id, text)
        )
        return int(cur.rowcount or 0)

    @staticmethod
    async def delete_image(conn: aiosqlite.Connection, image_id: int) -> None:
        await conn.execute("DELETE FROM images_fts WHERE rowid = ?", (image_id,))
        await conn.execute("DELETE FROM images WHERE id = ?", (image_id,))

    @staticmethod
    async def record_failure(conn: aiosqlite.Connection, key: str, reason: str) -> None:
        await conn.execute(
            "INSERT INTO failures (source_key, reason, at) VALUES (?, ?, ?) "
            "ON CONFLICT (source_key) DO UPDATE SET reason = excluded.reason, at = excluded.at",
            (key, reason, utc_now()),
        )

    @staticmethod
    async def clear_failures(conn: aiosqlite.Connection, keys: Sequence[str]) -> None:
        """Forget the recorded failures of these sources (a batch that has now stored them)."""
        for chunk, marks in in_chunks(keys):
            await conn.execute(f"DELETE FROM failures WHERE source_key IN ({marks})", chunk)
