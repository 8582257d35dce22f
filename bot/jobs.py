"""The bot's own state and its indexing queue: pending photos survive a restart.

Everything the bot must remember that is not part of the photo library lives in one SQLite file
in the data folder (`bot.sqlite3`), apart from the library's catalog so either can be deleted or
rebuilt without touching the other:

* `jobs`: photos seen but not yet indexed. A job is written *before* anything is downloaded, so a
  crash, a restart or a Discord outage loses nothing; the worker deletes a job only once its
  outcome is committed in the library (or it has definitely failed).
* `channel_rules`: per-guild include/exclude lists.
* `backfill`: how far back each channel's history has been scanned, so a backfill resumes.
* `threads`: each thread's parent, needed to decide who may see photos from archived threads.
* `errors`: the last few problems, for `/shoebox status`.
* `seen`: the newest message seen in each channel, so that photos posted while the bot was away
  are caught up when it comes back.

`IndexQueue` is the worker. It takes due jobs a batch at a time, downloads them concurrently (a
few at once), hands the bytes to `Library.index` (which decodes and embeds in executors, so the
event loop and the gateway heartbeat never wait on the model), retries failed downloads with
backoff, and applies deletions that arrive while a batch is in flight. The queue is bounded:
producers (a backfill, a burst of uploads) wait for room instead of growing it without limit.
Nothing here imports discord: the Discord layer passes in a download function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import aiosqlite

from bot.scope import KnownThread
from bot.tasks import cancel_and_wait
from store.db import SourceRecord, apply_migrations, in_chunks, open_connection, utc_now
from store.ingest import too_large_reason
from store.library import IncomingImage, IndexOutcome, Library

log = logging.getLogger(__name__)

DB_FILE = "bot.sqlite3"
SCHEMA_VERSION = 6
KEEP_ERRORS = 50

# Each entry upgrades the schema from version i to i + 1. Append; never edit a released step.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        attachment_id INTEGER NOT NULL UNIQUE,
        guild_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        message_id INTEGER NOT NULL,
        author_id INTEGER,
        author_name TEXT,
        channel_name TEXT,
        filename TEXT NOT NULL,
        url TEXT NOT NULL,
        size INTEGER NOT NULL DEFAULT 0,
        posted_text TEXT NOT NULL DEFAULT '',
        posted_at TEXT NOT NULL,
        react INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_try REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        queued_at TEXT NOT NULL
    );
    CREATE INDEX jobs_due ON jobs (next_try, id);
    CREATE INDEX jobs_message ON jobs (message_id);
    CREATE INDEX jobs_channel ON jobs (channel_id);
    CREATE INDEX jobs_guild ON jobs (guild_id);
    CREATE TABLE channel_rules (
        guild_id INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        mode TEXT NOT NULL CHECK (mode IN ('include', 'exclude')),
        PRIMARY KEY (guild_id, channel_id)
    );
    CREATE TABLE backfill (
        channel_id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        before_id INTEGER,
        scanned INTEGER NOT NULL DEFAULT 0,
        queued INTEGER NOT NULL DEFAULT 0,
        done INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE threads (
        thread_id INTEGER PRIMARY KEY,
        parent_id INTEGER NOT NULL,
        guild_id INTEGER NOT NULL,
        private INTEGER NOT NULL DEFAULT 0,
        owner_id INTEGER
    );
    CREATE INDEX threads_guild ON threads (guild_id);
    CREATE INDEX threads_parent ON threads (parent_id);
    CREATE TABLE errors (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        place TEXT NOT NULL,
        message TEXT NOT NULL
    );
    """,
    # Problems are shown per server: a file name or message from one server is nobody else's.
    """
    ALTER TABLE errors ADD COLUMN guild_id INTEGER;
    CREATE INDEX errors_guild ON errors (guild_id, id);
    """,
    # Catching up after a restart starts from the newest message seen in each channel.
    """
    CREATE TABLE seen (
        channel_id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        newest_id INTEGER NOT NULL
    );
    CREATE INDEX seen_guild ON seen (guild_id);
    """,
    # A problem about one channel (a file name, its history) is shown only to who can view it.
    """
    ALTER TABLE errors ADD COLUMN channel_id INTEGER;
    """,
    # Messages whose photos someone asked to forget: a later backfill must not bring them back.
    """
    CREATE TABLE forgotten (
        message_id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        at TEXT NOT NULL
    );
    """,
    # ... kept per server: a link pasted in one server may carry another server's message id.
    """
    CREATE TABLE forgotten_in (
        message_id INTEGER NOT NULL,
        guild_id INTEGER NOT NULL,
        at TEXT NOT NULL,
        PRIMARY KEY (message_id, guild_id)
    );
    INSERT INTO forgotten_in SELECT message_id, guild_id, at FROM forgotten;
    DROP TABLE forgotten;
    ALTER TABLE forgotten_in RENAME TO forgotten;
    """,
]
assert len(MIGRATIONS) == SCHEMA_VERSION


@dataclass(frozen=True)
class IndexJob:
    """One attachment to download and index, with everything its library source needs."""

    attachment_id: int
    guild_id: int
    channel_id: int
    message_id: int
    filename: str
    url: str
    posted_at: str
    author_id: int | None = None
    author_name: str | None = None
    channel_name: str | None = None
    posted_text: str = ""
    size: int = 0
    react: bool = False  # acknowledge with a reaction once indexed (live posts, not backfill)
    attempts: int = 0
    id: int | None = None

    def source(self) -> SourceRecord:
        return SourceRecord(
            kind="discord",
            filename=self.filename,
            posted_at=self.posted_at,
            guild_id=self.guild_id,
            channel_id=self.channel_id,
            message_id=self.message_id,
            attachment_id=self.attachment_id,
            author_id=self.author_id,
            author_name=self.author_name,
            channel_name=self.channel_name,
            posted_text=self.posted_text,
        )


@dataclass(frozen=True)
class BackfillState:
    """How far a channel's history scan got: `before_id` is the oldest message already scanned."""

    channel_id: int
    guild_id: int
    before_id: int | None
    scanned: int = 0
    queued: int = 0
    done: bool = False
    updated_at: str = ""


@dataclass(frozen=True)
class SeenMark:
    """The newest message of a channel known to have been seen (live, by a backfill or a catch-up)."""

    channel_id: int
    guild_id: int
    newest_id: int


@dataclass(frozen=True)
class ErrorNote:
    at: str
    place: str
    message: str
    channel_id: int | None = None  # the channel it is about, if any


_JOB_COLUMNS = (
    "attachment_id, guild_id, channel_id, message_id, filename, url, posted_at, author_id, "
    "author_name, channel_name, posted_text, size, react, attempts, id"
)


def _job_from_row(row: Sequence[object]) -> IndexJob:
    values = list(row)
    values[12] = bool(values[12])
    return IndexJob(*values)  # type: ignore[arg-type]


async def _forgotten_among(conn: aiosqlite.Connection, message_ids: set[int]) -> set[tuple[int, int]]:
    """(message, server) for those of these messages whose photos were forgotten on request."""
    found: set[tuple[int, int]] = set()
    for chunk, marks in in_chunks(sorted(message_ids)):
        async with conn.execute(f"SELECT message_id, guild_id FROM forgotten WHERE message_id IN ({marks})", chunk) as cur:
            found.update((int(row[0]), int(row[1])) for row in await cur.fetchall())
    return found


class JobStore:
    """Async access to `bot.sqlite3`. One connection; multi-statement writes hold a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> "JobStore":
        store = cls(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        store._conn = await open_connection(path)
        try:
            await store._migrate()
        except BaseException:
            await store.close()  # an open connection would keep the process from exiting
            raise
        return store

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def conn(self) -> aiosqlite.Connection:
        assert self._conn is not None, "job store is not open"
        return self._conn

    async def _migrate(self) -> None:
        await apply_migrations(self.conn, self.path, MIGRATIONS)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            else:
                await self.conn.execute("COMMIT")

    async def _scalar(self, sql: str, params: Sequence[object] = ()) -> int:
        async with self.conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # ---- jobs -----------------------------------------------------------------------------

    async def add(self, jobs: Sequence[IndexJob]) -> int:
        """Persist jobs; an attachment already queued is not queued twice, and the photos of a
        message someone asked to forget are not queued at all. Returns how many are new."""
        if not jobs:
            return 0
        now = utc_now()
        async with self._transaction() as conn:
            forgotten = await _forgotten_among(conn, {j.message_id for j in jobs})
            jobs = [j for j in jobs if (j.message_id, j.guild_id) not in forgotten]
            before = conn.total_changes
            await conn.executemany(
                "INSERT OR IGNORE INTO jobs (attachment_id, guild_id, channel_id, message_id, filename, "
                "url, posted_at, author_id, author_name, channel_name, posted_text, size, react, "
                "queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        j.attachment_id, j.guild_id, j.channel_id, j.message_id, j.filename, j.url,
                        j.posted_at, j.author_id, j.author_name, j.channel_name, j.posted_text,
                        j.size, int(j.react), now,
                    )
                    for j in jobs
                ],
            )
            return conn.total_changes - before

    async def remember_forgotten(self, message_ids: Iterable[int], guild_id: int) -> None:
        """Keep, for good, that these messages' photos were forgotten on request."""
        async with self._transaction() as conn:
            await conn.executemany(
                "INSERT OR IGNORE INTO forgotten (message_id, guild_id, at) VALUES (?, ?, ?)",
                [(int(m), guild_id, utc_now()) for m in message_ids],
            )

    async def due(self, limit: int, now: float) -> list[IndexJob]:
        async with self.conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE next_try <= ? ORDER BY next_try, id LIMIT ?",
            (now, limit),
        ) as cur:
            return [_job_from_row(r) for r in await cur.fetchall()]

    async def seconds_until_due(self, now: float) -> float | None:
        async with self.conn.execute("SELECT MIN(next_try) FROM jobs") as cur:
            row = await cur.fetchone()
        if not row or row[0] is None:
            return None
        return max(0.0, float(row[0]) - now)

    async def finish(self, job_ids: Iterable[int]) -> None:
        ids = [(int(i),) for i in job_ids]
        if ids:
            async with self._transaction() as conn:
                await conn.executemany("DELETE FROM jobs WHERE id = ?", ids)

    async def postpone(self, job_id: int, attempts: int, next_try: float, error: str) -> None:
        async with self._lock:
            await self.conn.execute(
                "UPDATE jobs SET attempts = ?, next_try = ?, last_error = ? WHERE id = ?",
                (attempts, next_try, error[:500], job_id),
            )

    async def pending(self, guild_id: int | None = None, channel_ids: Iterable[int] | None = None) -> int:
        """Jobs waiting, in every server or in one; only those posted in `channel_ids`, if given."""
        if channel_ids is not None:
            return await self._pending_in(channel_ids)
        if guild_id is None:
            return await self._scalar("SELECT COUNT(*) FROM jobs")
        return await self._scalar("SELECT COUNT(*) FROM jobs WHERE guild_id = ?", (guild_id,))

    async def _pending_in(self, channel_ids: Iterable[int]) -> int:
        total = 0
        for chunk, marks in in_chunks(sorted(set(channel_ids))):
            total += await self._scalar(f"SELECT COUNT(*) FROM jobs WHERE channel_id IN ({marks})", chunk)
        return total

    async def drop_messages(self, message_ids: Iterable[int], guild_id: int | None = None) -> int:
        """Drop the pending jobs of these messages (only those posted in `guild_id`, if given)."""
        ids = [(int(i),) for i in message_ids]
        if not ids:
            return 0
        async with self._transaction() as conn:
            before = conn.total_changes
            if guild_id is None:
                await conn.executemany("DELETE FROM jobs WHERE message_id = ?", ids)
            else:
                await conn.executemany(
                    "DELETE FROM jobs WHERE message_id = ? AND guild_id = ?", [(i, guild_id) for (i,) in ids]
                )
            return conn.total_changes - before

    async def drop_attachments(self, attachment_ids: Iterable[int]) -> int:
        ids = [(int(i),) for i in attachment_ids]
        if not ids:
            return 0
        async with self._transaction() as conn:
            before = conn.total_changes
            await conn.executemany("DELETE FROM jobs WHERE attachment_id = ?", ids)
            return conn.total_changes - before

    async def drop_where(self, column: str, value: int) -> int:
        """Drop pending jobs of a channel or guild (it was deleted, excluded or left)."""
        if column not in {"channel_id", "guild_id"}:
            raise ValueError(f"cannot drop jobs by {column}")
        async with self._lock:
            cur = await self.conn.execute(f"DELETE FROM jobs WHERE {column} = ?", (value,))
            return cur.rowcount

    async def set_posted_text(self, message_id: int, text: str) -> int:
        """The message's words were edited: its queued jobs will index the new ones."""
        async with self._lock:
            cur = await self.conn.execute("UPDATE jobs SET posted_text = ? WHERE message_id = ?", (text, message_id))
            return cur.rowcount

    async def attachments_of(self, message_id: int) -> list[int]:
        async with self.conn.execute(
            "SELECT attachment_id FROM jobs WHERE message_id = ?", (message_id,)
        ) as cur:
            return [int(r[0]) for r in await cur.fetchall()]

    # ---- channel rules ----------------------------------------------------------------------

    async def set_rule(self, guild_id: int, channel_id: int, mode: str | None) -> None:
        """`mode` is 'include', 'exclude', or None to remove the channel's rule."""
        async with self._lock:
            if mode is None:
                await self.conn.execute(
                    "DELETE FROM channel_rules WHERE guild_id = ? AND channel_id = ?", (guild_id, channel_id)
                )
            else:
                await self.conn.execute(
                    "INSERT INTO channel_rules (guild_id, channel_id, mode) VALUES (?, ?, ?) "
                    "ON CONFLICT (guild_id, channel_id) DO UPDATE SET mode = excluded.mode",
                    (guild_id, channel_id, mode),
                )

    async def rules(self, guild_id: int | None = None) -> dict[int, dict[int, str]]:
        """guild id -> {channel id -> mode}, for one guild or all of them."""
        sql = "SELECT guild_id, channel_id, mode FROM channel_rules"
        params: tuple[object, ...] = ()
        if guild_id is not None:
            sql += " WHERE guild_id = ?"
            params = (guild_id,)
        out: dict[int, dict[int, str]] = {}
        async with self.conn.execute(sql, params) as cur:
            for g, c, mode in await cur.fetchall():
                out.setdefault(int(g), {})[int(c)] = str(mode)
        return out

    # ---- backfill progress ------------------------------------------------------------------

    async def backfill_state(self, channel_id: int) -> BackfillState | None:
        async with self.conn.execute(
            "SELECT channel_id, guild_id, before_id, scanned, queued, done, updated_at FROM backfill "
            "WHERE channel_id = ?",
            (channel_id,),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return BackfillState(int(row[0]), int(row[1]), row[2], int(row[3]), int(row[4]), bool(row[5]), str(row[6]))

    async def backfill_states(self, guild_id: int) -> list[BackfillState]:
        async with self.conn.execute(
            "SELECT channel_id, guild_id, before_id, scanned, queued, done, updated_at FROM backfill "
            "WHERE guild_id = ? ORDER BY updated_at DESC",
            (guild_id,),
        ) as cur:
            rows = await cur.fetchall()
        return [
            BackfillState(int(r[0]), int(r[1]), r[2], int(r[3]), int(r[4]), bool(r[5]), str(r[6])) for r in rows
        ]

    async def save_backfill(self, state: BackfillState) -> None:
        async with self._lock:
            await self.conn.execute(
                "INSERT INTO backfill (channel_id, guild_id, before_id, scanned, queued, done, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (channel_id) DO UPDATE SET "
                "before_id = excluded.before_id, scanned = excluded.scanned, queued = excluded.queued, "
                "done = excluded.done, updated_at = excluded.updated_at",
                (
                    state.channel_id, state.guild_id, state.before_id, state.scanned, state.queued,
                    int(state.done), utc_now(),
                ),
            )

    async def reset_backfill(self, channel_id: int) -> None:
        async with self._lock:
            await self.conn.execute("DELETE FROM backfill WHERE channel_id = ?", (channel_id,))

    # ---- threads ----------------------------------------------------------------------------

    async def remember_thread(self, thread: KnownThread) -> None:
        async with self._lock:
            await self.conn.execute(
                "INSERT INTO threads (thread_id, parent_id, guild_id, private, owner_id) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (thread_id) DO UPDATE SET parent_id = excluded.parent_id, "
                "private = excluded.private, owner_id = excluded.owner_id",
                (thread.thread_id, thread.parent_id, thread.guild_id, int(thread.private), thread.owner_id),
            )

    async def known_threads(self, guild_id: int | None = None) -> list[KnownThread]:
        sql = "SELECT thread_id, parent_id, guild_id, private, owner_id FROM threads"
        params: tuple[object, ...] = ()
        if guild_id is not None:
            sql += " WHERE guild_id = ?"
            params = (guild_id,)
        async with self.conn.execute(sql, params) as cur:
            return [KnownThread(int(a), int(b), int(c), bool(d), e) for a, b, c, d, e in await cur.fetchall()]

    async def threads_of(self, parent_id: int) -> list[int]:
        async with self.conn.execute("SELECT thread_id FROM threads WHERE parent_id = ?", (parent_id,)) as cur:
            return [int(r[0]) for r in await cur.fetchall()]

    # ---- the newest message seen per channel ------------------------------------------------

    async def note_seen(self, channel_id: int, guild_id: int, message_id: int) -> None:
        """Record that every message of the channel up to `message_id` has been seen (never
        moves back)."""
        async with self._lock:
            await self.conn.execute(
                "INSERT INTO seen (channel_id, guild_id, newest_id) VALUES (?, ?, ?) "
                "ON CONFLICT (channel_id) DO UPDATE SET newest_id = MAX(newest_id, excluded.newest_id)",
                (channel_id, guild_id, message_id),
            )

    async def seen_marks(self) -> list[SeenMark]:
        async with self.conn.execute("SELECT channel_id, guild_id, newest_id FROM seen ORDER BY channel_id") as cur:
            return [SeenMark(int(a), int(b), int(c)) for a, b, c in await cur.fetchall()]

    async def forget_guild(self, guild_id: int) -> None:
        """Everything the bot kept about a guild it left."""
        async with self._transaction() as conn:
            for table in ("jobs", "channel_rules", "backfill", "threads", "seen"):
                await conn.execute(f"DELETE FROM {table} WHERE guild_id = ?", (guild_id,))

    async def forget_channel(self, channel_id: int, keep_rules: bool = False) -> None:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM jobs WHERE channel_id = ?", (channel_id,))
            if not keep_rules:
                await conn.execute("DELETE FROM channel_rules WHERE channel_id = ?", (channel_id,))
            await conn.execute("DELETE FROM backfill WHERE channel_id = ?", (channel_id,))
            await conn.execute("DELETE FROM seen WHERE channel_id = ?", (channel_id,))
            await conn.execute(
                "DELETE FROM threads WHERE thread_id = ? OR parent_id = ?", (channel_id, channel_id)
            )

    # ---- errors -----------------------------------------------------------------------------

    async def note_error(
        self, place: str, message: str, guild_id: int | None = None, channel_id: int | None = None
    ) -> None:
        """Keep a problem for `/shoebox status` in `guild_id` (None: for the logs only), about
        `channel_id` when it names something posted there."""
        async with self._lock:
            await self.conn.execute(
                "INSERT INTO errors (at, place, message, guild_id, channel_id) VALUES (?, ?, ?, ?, ?)",
                (utc_now(), place, message[:500], guild_id, channel_id),
            )
            # The latest KEEP_ERRORS of each server (and of none): a noisy server cannot push
            # another's problems out of its /shoebox status.
            await self.conn.execute(
                "DELETE FROM errors WHERE guild_id IS ? AND id NOT IN "
                "(SELECT id FROM errors WHERE guild_id IS ? ORDER BY id DESC LIMIT ?)",
                (guild_id, guild_id, KEEP_ERRORS),
            )

    async def recent_errors(self, limit: int = 5, guild_id: int | None = None) -> list[ErrorNote]:
        """The latest problems, of every server or of one."""
        where, params = ("", ()) if guild_id is None else ("WHERE guild_id = ? ", (guild_id,))
        async with self.conn.execute(
            f"SELECT at, place, message, channel_id FROM errors {where}ORDER BY id DESC LIMIT ?", (*params, limit)
        ) as cur:
            return [ErrorNote(str(a), str(b), str(c), d) for a, b, c, d in await cur.fetchall()]


# ---- the worker --------------------------------------------------------------------------------


class DownloadGone(Exception):
    """The attachment no longer exists (message deleted, access lost): drop the job, don't retry."""


Downloader = Callable[[IndexJob], Awaitable[bytes]]
OnIndexed = Callable[[IndexJob, IndexOutcome], Awaitable[None]]
OnBatch = Callable[[int], None]


@dataclass
class QueueCounters:
    """What the worker did since start: bot-wide, and per channel for `/shoebox status`.

    A channel's counters have no duplicates: whether the same bytes were already stored says
    nothing about that channel (they may come from another server, a channel hidden from this
    one's admins, or a local folder), so its photo counts as indexed there.
    """

    indexed: int = 0
    duplicates: int = 0
    unchanged: int = 0
    rejected: int = 0
    gave_up: int = 0
    retried: int = 0
    batches: int = 0


@dataclass
class QueueSettings:
    max_pending: int = 5000
    batch_size: int = 16
    max_attempts: int = 4
    retry_delays: tuple[float, ...] = (10.0, 60.0, 300.0)
    download_concurrency: int = 4
    download_timeout: float = 120.0
    max_file_bytes: int = 50 * 1024 * 1024
    idle_poll: float = 60.0


@dataclass
class _InFlight:
    """The batch the worker holds, and what happened to its messages meanwhile.

    From the moment the worker asks the job table for a batch (`taking`) until the batch is
    done, a deletion or an edit cannot reach those jobs through the table any more, so it is
    noted here and applied once the batch is committed.
    """

    jobs: dict[int, IndexJob] = field(default_factory=dict)  # attachment id -> job
    gone: set[int] = field(default_factory=set)  # attachment ids deleted while in flight
    taking: list[Callable[[IndexJob], bool]] | None = None  # deletions while the batch is fetched
    edited: dict[int, str] = field(default_factory=dict)  # message id -> words edited meanwhile


class IndexQueue:
    """The persistent, bounded indexing queue and its single worker task."""

    def __init__(
        self,
        store: JobStore,
        library: Library,
        download: Downloader,
        settings: QueueSettings | None = None,
        on_indexed: OnIndexed | None = None,
        on_new_images: OnBatch | None = None,
        accepts: Callable[[IndexJob], bool] | None = None,
    ) -> None:
        self.store = store
        self.library = library
        self.download = download
        self.settings = settings or QueueSettings()
        # Asked again as jobs are submitted: a backfill may hold a page while the bot leaves the
        # server or the channel is excluded, and must not queue it after that.
        self.accepts = accepts
        self.on_indexed = on_indexed
        self.on_new_images = on_new_images  # told how many new images each batch stored
        self.counters = QueueCounters()
        self._counters_by_channel: dict[int, QueueCounters] = {}
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._pause = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._in_flight = _InFlight()
        self._callbacks: set[asyncio.Task[None]] = set()

    # ---- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="shoebox-index-worker")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for callback in list(self._callbacks):
            callback.cancel()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold the worker between batches (while the library is re-embedded, for instance)."""
        async with self._pause:
            yield

    # ---- producers --------------------------------------------------------------------------

    async def submit(self, jobs: Sequence[IndexJob], wait: bool = True) -> int:
        """Persist jobs and wake the worker; returns how many were new.

        When the queue holds `max_pending` jobs or more, waits (if `wait`) until the worker has
        made room: a backfill slows down to the speed of indexing instead of filling the disk.
        The bound is soft by at most one submission.
        """
        if not jobs:
            return 0
        while wait and await self.store.pending() >= self.settings.max_pending:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                pass
        if self.accepts is not None:
            jobs = [job for job in jobs if self.accepts(job)]
        added = await self.store.add(jobs)
        if added:
            self._wake.set()
        return added

    async def pending(self, guild_id: int | None = None, channel_ids: Iterable[int] | None = None) -> int:
        return await self.store.pending(guild_id, channel_ids)

    def counters_of(self, channel_ids: Iterable[int]) -> QueueCounters:
        """What the worker did since start in these channels and threads, added up.

        Kept per channel rather than per server: a server's admin is shown only the channels they
        can view, and a server-wide figure would move with every photo posted in the others.
        """
        total = QueueCounters()
        for channel_id in set(channel_ids):
            counters = self._counters_by_channel.get(channel_id)
            if counters is None:
                continue
            for counter in fields(QueueCounters):
                setattr(total, counter.name, getattr(total, counter.name) + getattr(counters, counter.name))
        return total

    def _tally(self, job: IndexJob, name: str, name_here: str | None = None) -> None:
        """Count one `name` bot-wide, and one `name_here` (by default the same) for the job's channel."""
        here = self._counters_by_channel.setdefault(job.channel_id, QueueCounters())
        for counters, counted in ((self.counters, name), (here, name_here or name)):
            setattr(counters, counted, getattr(counters, counted) + 1)

    # ---- forgetting -------------------------------------------------------------------------

    def _mark_gone(self, predicate: Callable[[IndexJob], bool]) -> None:
        flight = self._in_flight
        if flight.taking is not None:
            flight.taking.append(predicate)
        for attachment_id, job in flight.jobs.items():
            if predicate(job):
                flight.gone.add(attachment_id)

    async def update_text(self, message_id: int, text: str) -> int:
        """A message's words were edited: its photos, queued or indexed, carry the new words
        (and are found by them, not by the old). Returns how many indexed photos changed."""
        self._in_flight.edited[message_id] = text
        await self.store.set_posted_text(message_id, text)
        return await self.library.set_posted_text(message_id, text)

    async def forget_messages(
        self, message_ids: Iterable[int], *, guild_id: int | None = None, for_good: bool = False
    ) -> list[int]:
        """Messages were deleted: drop their pending jobs and their photos. Returns image ids gone.

        With `guild_id`, only what was posted in that server is touched: a member names a message
        by pasting a link, and a link written in one server can carry another server's message id.
        `for_good` (someone asked, and the message is still there) also keeps them from being
        queued again, by a backfill passing by or an edit.
        """
        ids = {int(i) for i in message_ids}
        if not ids:
            return []
        if for_good and guild_id is not None:
            await self.store.remember_forgotten(ids, guild_id)

        self._mark_gone(lambda job: job.message_id in ids and (guild_id is None or job.guild_id == guild_id))
        await self.store.drop_messages(ids, guild_id)
        return await self.library.forget_messages(ids, guild_id)

    async def forget_attachments(self, message_id: int, keep: set[int]) -> list[int]:
        """A message was edited: forget its attachments that are no longer in `keep`."""
        self._mark_gone(lambda job: job.message_id == message_id and job.attachment_id not in keep)
        queued = await self.store.attachments_of(message_id)
        await self.store.drop_attachments(a for a in queued if a not in keep)
        sources = await self.library.catalog.sources_for_messages([message_id])
        return await self.library.remove_sources([s for s in sources if s.attachment_id not in keep])

    async def forget_channel(self, channel_id: int, *, excluded: bool = False) -> list[int]:
        """A channel or thread was deleted, or `excluded`: its jobs and photos go, and its
        threads'. A deleted channel's rules go too; an excluded one keeps them, the exclusion
        first of all."""
        threads = await self.store.threads_of(channel_id)
        channels = {channel_id, *threads}
        self._mark_gone(lambda job: job.channel_id in channels)
        await self.store.forget_channel(channel_id, keep_rules=excluded)
        gone: list[int] = []
        for cid in channels:
            await self.store.drop_where("channel_id", cid)
            gone += await self.library.forget_where("channel_id", cid)
        return gone

    async def forget_guild(self, guild_id: int) -> list[int]:
        self._mark_gone(lambda job: job.guild_id == guild_id)
        await self.store.forget_guild(guild_id)
        return await self.library.forget_where("guild_id", guild_id)

    # ---- the worker -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            # Cleared before looking for work, so a job submitted while we look still wakes us.
            self._wake.clear()
            try:
                processed = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # one bad batch must not stop indexing for good
                log.exception("Indexing batch failed")
                await self._note("indexing", f"batch failed: {error}")
                await asyncio.sleep(5.0)
                continue
            if processed:
                continue
            wait = await self.store.seconds_until_due(time.time())
            timeout = self.settings.idle_poll if wait is None else min(wait, self.settings.idle_poll)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.05))
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> int:
        """Process one batch of due jobs; returns how many jobs it took (0: nothing due)."""
        async with self._pause:
            flight = self._in_flight
            flight.taking = []
            try:
                jobs = await self.store.due(self.settings.batch_size, time.time())
            finally:
                deleted, flight.taking = flight.taking, None
            if not jobs:
                flight.edited.clear()  # nothing taken: every edit has reached the table
                return 0
            await self._process(jobs, deleted)
            self.counters.batches += 1
            self._room.set()
            return len(jobs)

    async def drain(self, timeout: float = 60.0) -> None:
        """Process until no job is due (tests, the benchmark, a clean shutdown)."""
        deadline = time.monotonic() + timeout
        while await self.run_once():
            if time.monotonic() > deadline:
                raise TimeoutError("indexing queue did not drain in time")

    async def _fetch(self, job: IndexJob, gate: asyncio.Semaphore) -> bytes:
        if job.size and job.size > self.settings.max_file_bytes:
            raise _TooBig(too_large_reason(job.size, self.settings.max_file_bytes))
        async with gate:
            return await asyncio.wait_for(self.download(job), timeout=self.settings.download_timeout)

    async def _process(self, jobs: list[IndexJob], deleted: Sequence[Callable[[IndexJob], bool]] = ()) -> None:
        flight = self._in_flight
        for job in jobs:
            flight.jobs[job.attachment_id] = job
            if any(predicate(job) for predicate in deleted):
                flight.gone.add(job.attachment_id)  # deleted while the batch was being fetched
        try:
            gate = asyncio.Semaphore(self.settings.download_concurrency)
            results = await asyncio.gather(*(self._fetch(job, gate) for job in jobs), return_exceptions=True)
            finished: list[IndexJob] = []
            items: list[IncomingImage] = []
            downloaded: list[IndexJob] = []
            for job, result in zip(jobs, results):
                if isinstance(result, bytes):
                    items.append(IncomingImage(job.source(), result))
                    downloaded.append(job)
                elif isinstance(result, DownloadGone):
                    log.debug("Dropping %s: %s", job.filename, result)
                    finished.append(job)
                elif isinstance(result, _TooBig):
                    log.info("Not indexing %s: %s", job.filename, result)
                    self._tally(job, "rejected")
                    await self._note("index", f"{job.filename} (message {job.message_id}): {result}", job)
                    finished.append(job)
                elif isinstance(result, asyncio.CancelledError):
                    raise result
                else:
                    await self._retry_or_give_up(job, _describe(result))
            outcomes: list[IndexOutcome] = []
            if items:
                try:
                    outcomes = await self.library.index(items)
                except Exception as error:
                    log.exception("Library could not index a batch of %d", len(items))
                    for job in downloaded:
                        await self._retry_or_give_up(job, f"indexing failed: {error}")
                    downloaded = []
            by_attachment = {o.source.attachment_id: o for o in outcomes}
            finished.extend(downloaded)
            # Deletions that arrived while this batch was downloading or embedding.
            gone = [flight.jobs[a] for a in flight.gone if a in flight.jobs]
            if gone:
                sources = await self.library.catalog.sources_for_messages({j.message_id for j in gone})
                dead = {j.attachment_id for j in gone}
                await self.library.remove_sources([s for s in sources if s.attachment_id in dead])
            # Edits that arrived meanwhile: the batch was stored with the words it was queued with.
            for message_id in {job.message_id for job in downloaded} & flight.edited.keys():
                await self.library.set_posted_text(message_id, flight.edited[message_id])
            await self.store.finish(j.id for j in finished if j.id is not None)
            dead_ids = {j.attachment_id for j in gone}
            stored = 0
            for job in downloaded:
                outcome = by_attachment.get(job.attachment_id)
                if outcome is None or job.attachment_id in dead_ids:
                    continue
                self._count(job, outcome)
                stored += outcome.status == "indexed"
                if outcome.status == "failed":
                    await self._note(
                        "index", f"could not index {job.filename} (message {job.message_id}): {outcome.reason}", job
                    )
                elif job.react and self.on_indexed is not None:
                    self._spawn(self.on_indexed(job, outcome))
            if stored and self.on_new_images is not None:
                self.on_new_images(stored)
        finally:
            for job in jobs:
                flight.jobs.pop(job.attachment_id, None)
                flight.gone.discard(job.attachment_id)
            flight.edited.clear()

    def _count(self, job: IndexJob, outcome: IndexOutcome) -> None:
        # "failed": not an image, or one the decoder refused; the reason is noted and in the catalog.
        name = {"indexed": "indexed", "duplicate": "duplicates", "unchanged": "unchanged"}.get(outcome.status, "rejected")
        self._tally(job, name, "indexed" if name == "duplicates" else name)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("Post-indexing callback failed")

        task = asyncio.ensure_future(guarded())
        self._callbacks.add(task)
        task.add_done_callback(self._callbacks.discard)

    async def _retry_or_give_up(self, job: IndexJob, reason: str) -> None:
        attempts = job.attempts + 1
        if job.id is None:
            return
        if attempts >= self.settings.max_attempts:
            self._tally(job, "gave_up")
            log.warning("Giving up on %s after %d attempts: %s", job.filename, attempts, reason)
            await self.store.finish([job.id])
            await self._note(
                "download", f"gave up on {job.filename} (message {job.message_id}) after {attempts} tries: {reason}",
                job,
            )
            return
        delays = self.settings.retry_delays or (10.0,)
        delay = delays[min(attempts - 1, len(delays) - 1)]
        self._tally(job, "retried")
        log.info("Will retry %s in %.0fs: %s", job.filename, delay, reason)
        await self.store.postpone(job.id, attempts, time.time() + delay, reason)

    async def _note(self, place: str, message: str, job: IndexJob | None = None) -> None:
        try:
            await self.store.note_error(
                place, message, None if job is None else job.guild_id, None if job is None else job.channel_id
            )
        except Exception:
            log.exception("Could not record an error")


class _TooBig(Exception):
    pass


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return "download timed out"
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


__all__ = [
    "BackfillState",
    "DB_FILE",
    "DownloadGone",
    "Downloader",
    "ErrorNote",
    "IndexJob",
    "IndexQueue",
    "JobStore",
    "QueueCounters",
    "QueueSettings",
]
