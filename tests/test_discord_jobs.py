"""The bot's job file and indexing queue on their own: bounded, deduplicated, persistent."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from bot.jobs import KEEP_ERRORS, MIGRATIONS, SCHEMA_VERSION, BackfillState, IndexJob, IndexQueue, JobStore, QueueSettings
from bot.scope import KnownThread
from store.library import Library
from store.db import DatabaseUnavailable
from tests.conftest import NOT_A_DATABASE, jpeg_bytes, sqlite_threads, sqlite_threads_left


def job(n: int, message: int | None = None) -> IndexJob:
    return IndexJob(
        attachment_id=1000 + n, guild_id=1, channel_id=10, message_id=message or 500 + n,
        filename=f"{n}.jpg", url=f"mem://{n}", posted_at="2024-01-01T00:00:00+00:00", author_name="Ann",
    )


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    opened = await JobStore.open(tmp_path / "bot.sqlite3")
    yield opened
    await opened.close()


async def test_jobs_are_deduplicated_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    first = await JobStore.open(path)
    assert await first.add([job(1), job(2), job(1)]) == 2
    assert await first.add([job(2)]) == 0
    await first.close()
    again = await JobStore.open(path)
    try:
        assert [j.attachment_id for j in await again.due(10, now=1e12)] == [1001, 1002]
        assert await again.drop_messages([501], guild_id=2) == 0  # posted in guild 1
        assert await again.drop_messages([502]) == 1
        assert await again.pending() == 1
    finally:
        await again.close()


async def test_a_job_file_that_cannot_be_used_is_refused_and_no_connection_stays_open(tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(NOT_A_DATABASE)
    future = tmp_path / "future.sqlite3"
    with sqlite3.connect(future) as conn:
        conn.execute("PRAGMA user_version = 999")
    before = sqlite_threads()
    with pytest.raises(DatabaseUnavailable, match="cannot be opened as a database") as damaged_refused:
        await JobStore.open(damaged)
    with pytest.raises(DatabaseUnavailable, match="newer Shoebox") as future_refused:
        await JobStore.open(future)
    # Checked while the errors (and the frames they hold) are alive, as they are while reported.
    assert not sqlite_threads_left(before), (damaged_refused.value, future_refused.value)


async def test_a_message_forgotten_on_request_is_not_queued_again_in_its_server_only(store: JobStore) -> None:
    """A link pasted in one server can carry another server's message id: what it forgets there
    must not keep the other server's message from being indexed."""
    await store.remember_forgotten([501], guild_id=1)
    await store.remember_forgotten([501], guild_id=3)
    elsewhere = dataclasses.replace(job(1), guild_id=2, attachment_id=2001)
    assert await store.add([job(1), job(2), elsewhere]) == 2
    assert sorted(j.attachment_id for j in await store.due(10, now=1e12)) == [1002, 2001]


async def test_rules_backfill_threads_and_errors_are_kept(store: JobStore) -> None:
    await store.set_rule(1, 10, "exclude")
    await store.set_rule(1, 11, "include")
    await store.set_rule(2, 20, "include")
    await store.set_rule(1, 11, None)
    assert await store.rules() == {1: {10: "exclude"}, 2: {20: "include"}}
    await store.save_backfill(BackfillState(10, 1, before_id=99, scanned=5, queued=1))
    state = await store.backfill_state(10)
    assert state is not None and (state.before_id, state.scanned, state.queued, state.done) == (99, 5, 1, False)
    await store.remember_thread(KnownThread(30, 10, 1, private=True, owner_id=7))
    assert await store.known_threads(1) == [KnownThread(30, 10, 1, True, 7)]
    await store.forget_channel(10)  # the parent goes: its rules, progress and threads too
    assert await store.backfill_state(10) is None and await store.known_threads(1) == []
    await store.note_error("test", "a quiet server's problem", guild_id=2)
    for n in range(KEEP_ERRORS + 10):
        await store.note_error("test", f"problem {n}", guild_id=1)
    recent = await store.recent_errors(KEEP_ERRORS + 20, guild_id=1)
    assert len(recent) == KEEP_ERRORS and recent[0].message == f"problem {KEEP_ERRORS + 9}"
    # A noisy server keeps its latest problems without pushing out another's.
    assert [e.message for e in await store.recent_errors(5, guild_id=2)] == ["a quiet server's problem"]


async def test_a_first_schema_job_file_is_upgraded_and_problems_are_kept_per_server(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
        conn.execute("INSERT INTO errors (at, place, message) VALUES ('2026-01-01T00:00:00+00:00', 'old', 'from before')")
    store = await JobStore.open(path)
    try:
        await store.note_error("index", "in server 1", guild_id=1)
        await store.note_error("index", "in server 2", guild_id=2)
        assert [e.message for e in await store.recent_errors(5, guild_id=1)] == ["in server 1"]
        assert [e.message for e in await store.recent_errors(5)] == ["in server 2", "in server 1", "from before"]
        # The table of the newest message seen per channel came with the upgrade too.
        await store.note_seen(10, 1, 500)
        assert [(m.channel_id, m.newest_id) for m in await store.seen_marks()] == [(10, 500)]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6


async def test_the_newest_message_seen_never_moves_back_and_leaves_with_its_channel(store: JobStore) -> None:
    await store.note_seen(10, 1, 500)
    await store.note_seen(10, 1, 400)  # an older message, seen later (a backfill page)
    await store.note_seen(11, 1, 300)
    await store.note_seen(20, 2, 900)
    assert [(m.channel_id, m.guild_id, m.newest_id) for m in await store.seen_marks()] == [
        (10, 1, 500), (11, 1, 300), (20, 2, 900)
    ]
    await store.forget_channel(11)
    await store.forget_guild(2)
    assert [(m.channel_id, m.newest_id) for m in await store.seen_marks()] == [(10, 500)]


async def test_a_full_queue_makes_producers_wait(store: JobStore, library: Library) -> None:
    data = {f"mem://{n}": jpeg_bytes((20 * n, 100, 200), mark=n) for n in range(6)}

    async def download(j: IndexJob) -> bytes:
        return data[j.url]

    queue = IndexQueue(store, library, download, QueueSettings(max_pending=2, batch_size=2))
    assert await queue.submit([job(0), job(1)]) == 2
    blocked = asyncio.create_task(queue.submit([job(2)]))
    await asyncio.sleep(0.3)
    assert not blocked.done()  # the queue is full: the producer waits instead of growing it
    assert await queue.run_once() == 2
    assert await asyncio.wait_for(blocked, timeout=10) == 1
    await queue.drain()
    assert (await library.stats())["images"] == 3
    assert queue.counters.indexed == 3 and await queue.pending() == 0


async def test_an_attachment_over_the_size_limit_is_noted_in_the_words_indexing_uses(
    store: JobStore, library: Library
) -> None:
    """Discord says the size before anything is downloaded; the note counts megabytes the way
    every other size reason does (1024 x 1024 bytes), so a 50 MB limit reads "50 MB"."""
    downloads: list[str] = []

    async def download(j: IndexJob) -> bytes:
        downloads.append(j.url)
        return jpeg_bytes((1, 2, 3))

    queue = IndexQueue(store, library, download, QueueSettings(max_file_bytes=50 * 1024 * 1024))
    await queue.submit([dataclasses.replace(job(0), size=int(80.2 * 1024 * 1024))])
    await queue.drain()
    assert downloads == [] and queue.counters.indexed == 0
    [note] = await store.recent_errors()
    assert note.message == "0.jpg (message 500): file is 80.2 MB, over the 50 MB limit"


async def test_the_worker_wakes_for_work_submitted_while_it_looks(
    store: JobStore, library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that arrives while the idle worker is deciding how long to sleep must not wait for
    the next poll (here a minute away)."""
    photo = jpeg_bytes((200, 40, 90))

    async def download(j: IndexJob) -> bytes:
        return photo

    queue = IndexQueue(store, library, download, QueueSettings(idle_poll=60.0))
    original = store.seconds_until_due
    arrived = []

    async def racing(now: float) -> float | None:
        result = await original(now)  # "nothing due": the worker is about to sleep...
        if not arrived:
            arrived.append(await queue.submit([job(0)]))  # ...when a photo arrives
        return result

    monkeypatch.setattr(store, "seconds_until_due", racing)
    queue.start()
    try:
        for _ in range(100):
            if arrived and not await queue.pending():
                break
            await asyncio.sleep(0.05)
        assert arrived == [1] and await queue.pending() == 0
    finally:
        await queue.stop()
