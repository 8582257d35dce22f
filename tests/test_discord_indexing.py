"""Auto-indexing: photos in, photos out, and nothing lost across a restart.

Every test posts through discord.py's gateway parsing into the real bot, which queues, downloads
from the (fake) CDN, decodes and embeds with the real small CLIP into a real library.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
import logging

import discord
import pytest

from bot.jobs import QueueSettings
from bot.scope import KnownThread
from store.db import SourceFilter
from store.library import Library
from tests.discord_harness import (
    ChannelSpec,
    Harness,
    Layout,
    StartBot,
    deny,
    offline_agent,
    scene_jpeg,
    snowflake,
    start_bot,  # noqa: F401 - fixture
)

CAMERA = "\N{CAMERA WITH FLASH}"
LAYOUT = Layout(channels=[ChannelSpec("general"), ChannelSpec("photos"), ChannelSpec("random")],
                members={"ann": [], "ben": []})


async def sources_of(library: Library, message: discord.Message) -> list:
    return await library.catalog.sources_for_messages([message.id])


async def test_an_upload_is_indexed_with_who_where_when_and_text(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    message = await harness.post("photos", "ann", "our red kite at the beach",
                                 files=[("kite.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    (source,) = await sources_of(library, message)
    assert source.kind == "discord"
    assert source.guild_id == harness.guild_id
    assert source.channel_id == harness.channel_ids["photos"]
    assert source.channel_name == "photos"
    assert source.message_id == message.id
    assert source.attachment_id == message.attachments[0].id
    assert source.author_id == harness.user_ids["ann"]
    assert source.author_name == "Ann"
    assert source.posted_text == "our red kite at the beach"
    assert source.filename == "kite.jpg"
    assert source.posted_at.startswith(message.created_at.strftime("%Y-%m-%dT%H:%M"))
    # The words people posted are searchable too.
    assert source.image_id in await library.catalog.text_matches("kite", 5, _everything())
    # A small reaction, nothing posted in the channel.
    assert harness.world.reactions == [(harness.channel_ids["photos"], message.id, CAMERA)]
    assert harness.world.sent == []


def _everything():  # type: ignore[no-untyped-def]
    from store.db import SourceFilter

    return SourceFilter()


async def test_the_bytes_decide_what_is_a_photo(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """A photo named .txt is indexed; a text file named .jpg is not, and gets no reaction."""
    harness = await start_bot(LAYOUT)
    disguised = await harness.post("general", "ann", files=[("notes.txt", scene_jpeg("blue", "star"))])
    fake = await harness.post("general", "ann", files=[("holiday.jpg", b"%PDF-1.4 not a picture at all")])
    await harness.drain()
    assert len(await sources_of(library, disguised)) == 1
    assert await sources_of(library, fake) == []
    assert [m for _, m, _ in harness.world.reactions] == [disguised.id]
    indexing = harness.bot.get_cog("Indexing")
    assert indexing.queue.counters.rejected == 1  # type: ignore[attr-defined]
    assert await indexing.queue.pending() == 0  # type: ignore[attr-defined]


async def test_no_reaction_when_reactions_are_off(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT, reaction=None)
    message = await harness.post("general", "ann", files=[("a.jpg", scene_jpeg("red", "square"))])
    await harness.drain()
    assert len(await sources_of(library, message)) == 1
    assert harness.world.reactions == []


async def test_questions_to_the_bot_and_its_own_posts_are_not_remembered(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("general", "ann", files=[("a.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    # A look-alike question: the attached photo is a query, not a memory.
    question = await harness.post("general", "ben", "like this?", files=[("q.jpg", scene_jpeg("green", "star"))],
                                  mention_bot=True)
    await harness.drain()
    assert await sources_of(library, question) == []
    replies = [s for s in harness.world.sent if s.files]
    assert replies, "the bot answered with photos"
    # The bot's answer (with the stored copy attached) came back over the gateway and was ignored.
    answers = [s.message_id for s in replies if s.message_id is not None]
    assert answers and await library.catalog.sources_for_messages(answers) == []
    assert (await library.stats())["sources"] == 1


async def test_deleting_a_message_forgets_its_photos(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    keep = await harness.post("general", "ann", files=[("k.jpg", scene_jpeg("red", "circle"))])
    gone = await harness.post("general", "ann", files=[("g1.jpg", scene_jpeg("blue", "star")),
                                                      ("g2.jpg", scene_jpeg("green", "heart"))])
    await harness.drain()
    assert (await library.stats())["images"] == 3
    await harness.delete_message(gone)
    assert await sources_of(library, gone) == []
    assert len(await sources_of(library, keep)) == 1
    assert (await library.stats())["images"] == 1
    assert library.vectors.count == 1


async def test_bulk_delete_forgets_every_message(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    messages = [
        await harness.post("random", "ben", files=[(f"{i}.jpg", scene_jpeg(colour, "square", seed=i))])
        for i, colour in enumerate(["red", "blue", "green", "yellow"])
    ]
    await harness.drain()
    assert (await library.stats())["images"] == 4
    await harness.bulk_delete("random", [m.id for m in messages[:3]])
    assert (await library.stats())["images"] == 1
    assert len(await sources_of(library, messages[3])) == 1


async def test_editing_attachments_away_forgets_just_those(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    message = await harness.post("general", "ann", "two", files=[("a.jpg", scene_jpeg("red", "circle")),
                                                                 ("b.jpg", scene_jpeg("blue", "cross"))])
    await harness.drain()
    first, second = message.attachments
    await harness.edit_attachments(message, keep=[first.id])
    assert [s.attachment_id for s in await sources_of(library, message)] == [first.id]
    assert (await library.stats())["images"] == 1


async def test_words_edited_out_of_a_message_stop_finding_its_photo(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """Someone posts a door code with a photo, then edits it out: the photo stays, the code goes,
    whether the photo was already indexed or still queued when the edit came."""
    harness = await start_bot(LAYOUT, run_worker=False)
    queued = await harness.post("photos", "ben", "the flat, door code 4471", files=[("q.jpg", scene_jpeg("blue", "star"))])
    await harness.edit_text(queued, "the flat")
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    message = await harness.post("photos", "ann", "our new flat, door code 4471", files=[("f.jpg", scene_jpeg("red", "circle"))])
    await indexing.queue.drain()  # type: ignore[union-attr]
    flt = SourceFilter(channel_ids=frozenset({harness.channel_ids["photos"]}), include_files=False)
    [source] = await sources_of(library, message)
    assert await library.catalog.text_matches("4471", 5, flt) == [source.image_id]

    await harness.edit_text(message, "our new flat")
    [edited] = await sources_of(library, message)
    assert edited.posted_text == "our new flat"
    assert await library.catalog.text_matches("4471", 5, flt) == []
    assert await library.catalog.text_matches("flat", 5, flt) != []
    [other] = await sources_of(library, queued)
    assert other.posted_text == "the flat"


async def test_a_mentioned_channel_is_not_named_in_the_words_kept(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    hidden = {"@everyone": deny(view_channel=True)}
    layout = Layout(channels=[ChannelSpec("photos"), ChannelSpec("merger", hidden), ChannelSpec("merger-with-acme", hidden)],
                    members={"ann": []})
    harness = await start_bot(layout)
    ids = harness.channel_ids
    text = f"the board photo, more in <#{ids['merger']}> and <#{ids['merger-with-acme']}>, not #merger-rumours"
    message = await harness.post("photos", "ann", text, files=[("board.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    [source] = await sources_of(library, message)
    assert source.posted_text == "the board photo, more in #channel and #channel, not #merger-rumours"


async def test_where_the_bot_may_not_react_photos_are_indexed_all_the_same(
    start_bot: StartBot, library: Library, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """The reaction is a courtesy: refused, it is skipped quietly (no error in the log)."""
    layout = Layout(channels=[ChannelSpec("photos", {"Shoebox": deny(add_reactions=True)})], members={"ann": []})
    harness = await start_bot(layout)
    with caplog.at_level("DEBUG", logger="bot"):
        message = await harness.post("photos", "ann", files=[("a.jpg", scene_jpeg("red", "circle"))])
        await harness.drain()
        await harness.settle()
    assert len(await sources_of(library, message)) == 1
    assert harness.world.reactions == []
    assert f"No reaction on message {message.id}" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert await harness.bot.jobs.recent_errors() == []


async def test_mentioned_people_and_roles_are_kept_by_name(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """Words are searched as people read them: "@Ben" finds the photo, "<@123...>" would not."""
    harness = await start_bot(Layout(roles={"crew": discord.Permissions.none()}, channels=[ChannelSpec("photos")],
                                     members={"ann": [], "ben": ["crew"]}))
    ben, crew = harness.user_ids["ben"], harness.role_ids["crew"]
    gone_role, gone_user = snowflake(), snowflake()
    text = f"<@{ben}> and the <@&{crew}> at the lake, with <@&{gone_role}> and <@{gone_user}>"
    message = await harness.post("photos", "ann", text, files=[("lake.jpg", scene_jpeg("blue", "circle"))])
    await harness.drain()
    [source] = await sources_of(library, message)
    assert source.posted_text == "@Ben and the @crew at the lake, with @deleted-role and @deleted-user"


async def test_an_edit_or_a_delete_while_the_worker_takes_the_batch_still_wins(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """The worker reads its batch from the job table on SQLite's thread; an edit or a delete
    handled while those rows are on their way back no longer finds them in the table, yet must
    still reach the photos."""
    harness = await start_bot(LAYOUT, run_worker=False)
    edited = await harness.post("photos", "ann", "door code 4471", files=[("a.jpg", scene_jpeg("red", "circle"))])
    deleted = await harness.post("photos", "ann", "gone", files=[("b.jpg", scene_jpeg("blue", "star"))])
    indexing = harness.bot.get_cog("Indexing")
    store = harness.bot.jobs
    take = store.due
    taken = asyncio.Event()

    async def slow_due(limit: int, now: float) -> list:
        jobs = await take(limit, now)
        taken.set()
        await asyncio.sleep(0.05)  # the rows are on their way back
        return jobs

    store.due = slow_due  # type: ignore[method-assign]
    worker = asyncio.create_task(indexing.queue.run_once())  # type: ignore[union-attr]
    await taken.wait()
    await harness.edit_text(edited, "a photo")
    await harness.delete_message(deleted)
    await worker
    assert await sources_of(library, deleted) == []
    [source] = await sources_of(library, edited)
    assert source.posted_text == "a photo"


async def test_deleting_a_channel_forgets_its_photos(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", files=[("p.jpg", scene_jpeg("red", "circle"))])
    other = await harness.post("general", "ann", files=[("g.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    await harness.delete_channel("photos")
    assert await library.catalog.find_sources("channel_id", harness.channel_ids["photos"]) == []
    assert len(await sources_of(library, other)) == 1


async def test_leaving_a_server_forgets_everything_from_it(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", files=[("p.jpg", scene_jpeg("red", "circle"))])
    await harness.post("general", "ben", files=[("g.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    await harness.remove_bot_from_guild()
    assert (await library.stats())["images"] == 0
    assert await harness.bot.jobs.rules(harness.guild_id) == {}


async def test_a_delete_during_indexing_still_wins(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """The message is deleted while its photo is being downloaded: it must not end up indexed."""
    harness = await start_bot(LAYOUT, run_worker=False)
    indexing = harness.bot.get_cog("Indexing")
    message = await harness.post("general", "ann", files=[("late.jpg", scene_jpeg("red", "circle"))])
    original = indexing.download  # type: ignore[union-attr]

    async def slow_download(job):  # type: ignore[no-untyped-def]
        data = await original(job)
        await harness.delete_message(message)  # arrives mid-flight
        return data

    indexing.queue.download = slow_download  # type: ignore[union-attr]
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert await sources_of(library, message) == []
    assert (await library.stats())["images"] == 0
    assert harness.world.reactions == []


async def test_failed_downloads_are_retried_then_succeed(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT, run_worker=False)
    message = await harness.post("general", "ann", files=[("flaky.jpg", scene_jpeg("red", "circle"))])
    harness.world.cdn_failures[message.attachments[0].url] = 2  # two 503s, then the file
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert len(await sources_of(library, message)) == 1
    assert indexing.queue.counters.retried == 2  # type: ignore[union-attr]


async def test_an_expired_cdn_link_is_refreshed_from_the_message(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT, run_worker=False)
    message = await harness.post("general", "ann", files=[("old.jpg", scene_jpeg("red", "circle"))])
    url = message.attachments[0].url
    data = harness.world.cdn.pop(url)  # the signed link expired...
    fresh = url.replace("?ex=1", "?ex=2")
    harness.world.cdn[fresh] = data  # ...and Discord hands out a new one with the message
    stored = harness.world.messages[message.channel.id][message.id]
    stored["attachments"] = [{**stored["attachments"][0], "url": fresh, "proxy_url": fresh}]
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert len(await sources_of(library, message)) == 1
    assert f"get_message {message.id}" in harness.world.calls


async def test_a_photo_gone_before_its_download_is_dropped_without_retries(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """An expired link sends the bot back to the message; a message deleted meanwhile, or one
    whose photo was edited away, has nothing left to index: the job ends, with no retry and no
    problem to report."""
    harness = await start_bot(LAYOUT, run_worker=False)
    deleted = await harness.post("general", "ann", files=[("a.jpg", scene_jpeg("red", "circle"))])
    edited = await harness.post("general", "ann", files=[("b.jpg", scene_jpeg("blue", "star"))])
    for message in (deleted, edited):
        harness.world.cdn.pop(message.attachments[0].url)  # the links expired
    del harness.world.messages[deleted.channel.id][deleted.id]  # no delete event reached the bot
    harness.world.messages[edited.channel.id][edited.id]["attachments"] = []  # nor an edit event
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert await indexing.queue.pending() == 0  # type: ignore[union-attr]
    assert indexing.queue.counters.retried == 0 and indexing.queue.counters.gave_up == 0  # type: ignore[union-attr]
    assert await harness.bot.jobs.recent_errors() == []
    assert (await library.stats())["images"] == 0


async def test_a_photo_over_the_size_limit_is_not_downloaded_and_is_reported(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT, run_worker=False)
    too_big = harness.bot.settings.ingest.max_file_bytes + 1
    message = await harness.post("general", "ann", files=[("huge.jpg", scene_jpeg("red", "circle"))],
                                 declared_sizes=[too_big])
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert f"cdn {message.attachments[0].url}" not in harness.world.calls
    assert indexing.queue.counters.rejected == 1  # type: ignore[union-attr]
    (note,) = await harness.bot.jobs.recent_errors()
    assert "huge.jpg" in note.message and "limit" in note.message
    assert (await library.stats())["images"] == 0


async def test_a_batch_the_library_could_not_store_is_tried_again(
    start_bot: StartBot, library: Library, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT, run_worker=False)
    message = await harness.post("general", "ann", files=[("c.jpg", scene_jpeg("red", "circle"))])
    index = library.index
    failures = [OSError("disk full")]

    async def failing_once(*args: object, **kwargs: object) -> object:
        if failures:
            raise failures.pop()
        return await index(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(library, "index", failing_once)
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert indexing.queue.counters.retried == 1  # type: ignore[union-attr]
    assert len(await sources_of(library, message)) == 1


async def test_giving_up_after_the_last_attempt_is_reported(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT, run_worker=False,
                              queue=QueueSettings(batch_size=4, max_attempts=2, retry_delays=(0.0,)))
    message = await harness.post("general", "ann", files=[("down.jpg", scene_jpeg("red", "circle"))])
    harness.world.cdn_failures[message.attachments[0].url] = 10
    indexing = harness.bot.get_cog("Indexing")
    await indexing.queue.drain()  # type: ignore[union-attr]
    assert await indexing.queue.pending() == 0  # type: ignore[union-attr]
    assert indexing.queue.counters.gave_up == 1  # type: ignore[union-attr]
    (note,) = await harness.bot.jobs.recent_errors()
    assert "down.jpg" in note.message and "2 tries" in note.message


async def test_pending_photos_survive_a_restart(start_bot: StartBot, settings, library: Library) -> None:  # noqa: F811
    """Photos queued when the bot stops are indexed after it starts again, from the job file alone."""
    harness = await start_bot(LAYOUT, run_worker=False)
    messages = [
        await harness.post("general", "ann", files=[(f"{c}.jpg", scene_jpeg(c, "circle"))])
        for c in ("red", "blue", "green")
    ]
    assert await harness.bot.get_cog("Indexing").queue.pending() == 3  # type: ignore[union-attr]
    assert (await library.stats())["images"] == 0
    world = harness.world
    await harness.stop()

    # A new process: a new library instance on the same folder, a new bot, the same Discord.
    reopened = await Library.open(settings, library.embedder)
    try:
        restarted = await Harness.start(settings, reopened, offline_agent(reopened), Layout(), world=world)
        try:
            await restarted.drain()
            for message in messages:
                assert len(await sources_of(reopened, message)) == 1
            assert await restarted.bot.get_cog("Indexing").queue.pending() == 0  # type: ignore[union-attr]
        finally:
            await restarted.stop()
    finally:
        await reopened.close()


async def test_excluded_channels_are_not_indexed(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    indexing = harness.bot.get_cog("Indexing")
    await indexing.set_rule(harness.guild_id, harness.channel_ids["random"], "exclude")  # type: ignore[union-attr]
    skipped = await harness.post("random", "ann", files=[("r.jpg", scene_jpeg("red", "circle"))])
    kept = await harness.post("general", "ann", files=[("g.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    assert await sources_of(library, skipped) == []
    assert len(await sources_of(library, kept)) == 1
    # With an include rule, only included channels are indexed.
    await indexing.set_rule(harness.guild_id, harness.channel_ids["photos"], "include")  # type: ignore[union-attr]
    only = await harness.post("photos", "ann", files=[("p.jpg", scene_jpeg("green", "heart"))])
    not_now = await harness.post("general", "ann", files=[("n.jpg", scene_jpeg("yellow", "star"))])
    await harness.drain()
    assert len(await sources_of(library, only)) == 1
    assert await sources_of(library, not_now) == []


async def test_a_failing_event_handler_is_logged_and_the_bot_carries_on(  # noqa: F811
    start_bot: StartBot, library: Library, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    harness = await start_bot(LAYOUT)

    async def disk_full(jobs: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness.bot.jobs, "add", disk_full)
    with caplog.at_level(logging.ERROR):
        await harness.post("general", "ann", files=[("a.jpg", scene_jpeg("red", "circle"))])
    assert any("Unhandled error in on_message" in r.getMessage() for r in caplog.records)
    assert harness.world.sent == []  # nothing about it in the channel
    monkeypatch.undo()
    later = await harness.post("general", "ann", files=[("b.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    assert len(await sources_of(library, later)) == 1


async def test_photos_posted_while_the_bot_was_away_are_caught_up_on_connecting(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """Live posts keep each channel's newest message; on (re)connecting the bot reads forward
    from it, queues what it missed (without reactions on old posts) and asks nothing of quiet
    channels."""
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", "before", files=[("a.jpg", scene_jpeg("red", "circle"))])
    await harness.post("general", "ben", "just words")
    await harness.post("random", "ben", "just words")
    await harness.drain()
    reactions = len(harness.world.reactions)
    # Away: 130 messages in #photos (more than a page), three of them with photos, one in #general.
    missed = []
    for n in range(130):
        files = [(f"m{n}.jpg", scene_jpeg("blue" if n % 2 else "green", "star", seed=n))] if n % 50 == 0 else []
        message_id = harness.post_while_away("photos", "ann", f"message {n}", files)
        if files:
            missed.append(message_id)
    missed.append(harness.post_while_away("general", "ben", "late", [("g.jpg", scene_jpeg("yellow", "heart"))]))
    calls = len(harness.world.calls)

    harness.bot.dispatch("connect")
    # Messages arrive as soon as the connection opens, before `on_ready`: this one must not
    # move #general's mark past the photo posted there while the bot was away.
    await harness.post("general", "ben", "hello again")
    harness.bot.dispatch("ready")
    indexing = harness.bot.get_cog("Indexing")
    for _ in range(100):  # the listener runs as a task of its own
        if indexing._catching_up is not None:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    assert await indexing._catching_up == (132, 4)  # type: ignore[union-attr]
    await harness.drain()

    indexed = await library.catalog.sources_for_messages(missed)
    assert sorted(s.message_id for s in indexed) == sorted(missed)
    assert len(harness.world.reactions) == reactions  # old posts get no reaction
    history = [c for c in harness.world.calls[calls:] if c.startswith("logs_from")]
    asked = {int(c.split()[1]) for c in history}
    assert asked == {harness.channel_ids["photos"], harness.channel_ids["general"]}  # #random had nothing new
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[harness.channel_ids["photos"]] == max(harness.world.messages[harness.channel_ids["photos"]])
    assert marks[harness.channel_ids["general"]] == max(harness.world.messages[harness.channel_ids["general"]])
    # Connecting again reads nothing twice.
    calls = len(harness.world.calls)
    await indexing.on_connect()  # type: ignore[union-attr]
    assert await indexing.catch_up() == (0, 0)  # type: ignore[union-attr]
    assert not any(c.startswith("logs_from") for c in harness.world.calls[calls:])


async def test_a_failed_catch_up_keeps_its_place_for_the_next_connection(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """History that cannot be read now is reported; posts arriving live meanwhile must not move
    the kept mark past the messages still unread, so the next connection finds them."""
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", "before")
    missed = harness.post_while_away("photos", "ann", "away", [("a.jpg", scene_jpeg("red", "circle"))])
    harness.world.history_failures[harness.channel_ids["photos"]] = 1
    indexing = harness.bot.get_cog("Indexing")
    await indexing.on_connect()  # type: ignore[union-attr]
    assert await indexing.catch_up() == (0, 0)  # type: ignore[union-attr]
    assert "catch-up" in [e.place for e in await harness.bot.jobs.recent_errors(5, harness.guild_id)]
    live = await harness.post("photos", "ben", "live now")
    await harness.drain()
    assert await library.catalog.sources_for_messages([missed]) == []

    assert await indexing.catch_up() == (2, 1)  # type: ignore[union-attr]
    await harness.drain()
    assert len(await library.catalog.sources_for_messages([missed])) == 1
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[harness.channel_ids["photos"]] == live.id


async def test_excluded_channels_are_not_caught_up(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("random", "ann", "seen")
    indexing = harness.bot.get_cog("Indexing")
    await indexing.set_rule(harness.guild_id, harness.channel_ids["random"], "exclude")  # type: ignore[union-attr]
    harness.post_while_away("random", "ann", "away", [("r.jpg", scene_jpeg("red", "circle"))])
    calls = len(harness.world.calls)
    await indexing.on_connect()  # type: ignore[union-attr]
    assert await indexing.catch_up() == (0, 0)  # type: ignore[union-attr]
    assert not any(c.startswith("logs_from") for c in harness.world.calls[calls:])


async def test_quiet_and_new_channels_are_caught_up_but_history_from_before_the_bot_is_not(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """Every channel is watched from the message that was newest when the bot connected, even one
    nobody has posted in since; a channel created while the bot was away, or created while it was
    there and quiet until it left, is read from its start. What came before a first connection is
    what a backfill is for."""
    harness = await start_bot(LAYOUT)
    quiet_new = await harness.create_channel("trip")
    await harness.post("photos", "ann", "seen after #trip was created")
    photos = {
        "general": harness.post_while_away("general", "ann", "quiet until now", [("g.jpg", scene_jpeg("blue", "star"))]),
        "trip": harness.post_while_away("trip", "ann", "first post", [("t.jpg", scene_jpeg("red", "circle"))]),
    }
    away_new = await harness.create_channel("offsite", while_away=True)
    photos["offsite"] = harness.post_while_away("offsite", "ben", "", [("o.jpg", scene_jpeg("green", "heart"))])
    harness.post_while_away("offsite", "ben", "just words")

    indexing = harness.bot.get_cog("Indexing")
    await indexing.on_connect()  # type: ignore[union-attr]
    # A post in the new channel before the catch-up reaches it must not make it look watched.
    live = await harness.post("offsite", "ann", "hello")
    assert await indexing.catch_up() == (5, 3)  # type: ignore[union-attr]
    await harness.drain()
    indexed = await library.catalog.sources_for_messages(list(photos.values()))
    assert sorted(s.message_id for s in indexed) == sorted(photos.values())
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[away_new] == live.id and marks[quiet_new] == photos["trip"]

    # A server the bot joins is watched from its present: its history is a backfill's.
    other = harness.add_guild(LAYOUT, "elsewhere")
    harness.use_guild(other)
    older = harness.post_while_away("photos", "ann", "before the bot", [("b.jpg", scene_jpeg("yellow", "star"))])
    await indexing.on_guild_join(harness.guild)  # type: ignore[union-attr]
    later = harness.post_while_away("photos", "ann", "while away", [("w.jpg", scene_jpeg("blue", "circle"))])
    await indexing.on_connect()  # type: ignore[union-attr]
    assert await indexing.catch_up() == (1, 1)  # type: ignore[union-attr]
    await harness.drain()
    assert [s.message_id for s in await library.catalog.sources_for_messages([older, later])] == [later]


async def test_a_later_post_does_not_move_the_mark_past_photos_still_on_their_way_to_the_queue(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """A post's photos wait for room in a full queue; a text post arriving meanwhile must not
    record the channel as seen past them, or a crash then would lose them for good."""
    harness = await start_bot(LAYOUT, run_worker=False)
    indexing = harness.bot.get_cog("Indexing")
    submit = indexing.queue.submit  # type: ignore[union-attr]
    room = asyncio.Event()

    async def full_queue(jobs, wait=True):  # type: ignore[no-untyped-def]
        await room.wait()
        return await submit(jobs, wait)

    indexing.queue.submit = full_queue  # type: ignore[union-attr]
    channel_id = harness.channel_ids["photos"]
    user_id = harness.user_ids["ann"]
    member = harness.world.members[(harness.guild_id, user_id)]

    def arrives(content: str, files: list) -> int:  # type: ignore[type-arg]
        data = harness.http.world_message(channel_id, harness.world.users[user_id], content,
                                          guild_id=harness.guild_id, member=member, attachments=files)
        harness.bot._connection.parse_message_create(data)  # type: ignore[arg-type]
        return int(data["id"])

    photo = arrives("the photo", [harness.upload("a.jpg", scene_jpeg("red", "circle"))])
    words = arrives("nice!", [])
    try:
        await asyncio.sleep(0.2)
        marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
        assert marks.get(channel_id, 0) < photo
    finally:
        room.set()
    await harness.settle()
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[channel_id] == words
    assert await indexing.queue.pending() == 1  # type: ignore[union-attr]


async def test_a_connection_begun_during_a_catch_up_keeps_new_channels_held_for_its_own(
    start_bot: StartBot, library: Library, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A pass that started before a reconnection must not end the new connection's care for
    channels that may be new; and a channel whose history the bot may not read is not held
    forever for lack of a catch-up it can never have."""
    no_history = (discord.Permissions.none(), discord.Permissions(read_message_history=True))
    layout = Layout(channels=[*LAYOUT.channels, ChannelSpec("notices", overwrites={"Shoebox": no_history})],
                    members=LAYOUT.members)
    harness = await start_bot(layout)
    await harness.post("photos", "ann", "seen")
    indexing = harness.bot.get_cog("Indexing")
    new = await harness.create_channel("offsite", while_away=True)
    missed = harness.post_while_away("offsite", "ben", "", [("o.jpg", scene_jpeg("green", "heart"))])
    await indexing.on_connect()  # type: ignore[union-attr]
    await harness.post("notices", "ann", "read it now or never")
    seen_marks = harness.bot.jobs.seen_marks

    async def reconnecting_meanwhile() -> list:
        marks = await seen_marks()
        monkeypatch.undo()
        harness.guild._remove_channel(harness.guild.get_channel(new))  # not in this pass's cache yet
        await indexing.on_connect()  # type: ignore[union-attr]
        return marks

    monkeypatch.setattr(harness.bot.jobs, "seen_marks", reconnecting_meanwhile)
    assert await indexing.catch_up() == (0, 0)  # type: ignore[union-attr]
    assert harness.channel_ids["notices"] not in indexing._holds  # type: ignore[union-attr]
    # A live post in the new channel arrives before the second connection's pass: still held.
    harness.guild._add_channel(discord.TextChannel(state=harness.bot._connection, guild=harness.guild,  # type: ignore[arg-type]
                                                   data=harness.world.channels[new]))
    await harness.post("offsite", "ann", "hello")
    assert await indexing.catch_up() == (2, 1)  # type: ignore[union-attr]
    await harness.drain()
    assert len(await library.catalog.sources_for_messages([missed])) == 1


async def test_a_channel_deleted_while_the_bot_was_away_takes_its_photos_with_it(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """Only Discord saying the channel is unknown counts: one merely missing from the cache
    (as an archived thread is) keeps its photos and its place."""
    harness = await start_bot(LAYOUT)
    gone = await harness.post("random", "ann", files=[("r.jpg", scene_jpeg("red", "circle"))])
    hidden = await harness.post("general", "ann", files=[("g.jpg", scene_jpeg("green", "heart"))])
    kept = await harness.post("photos", "ann", files=[("p.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    await harness.delete_channel("random", while_away=True)
    harness.guild._remove_channel(harness.channel("general"))  # still in Discord, not in the cache
    indexing = harness.bot.get_cog("Indexing")
    await indexing.on_connect()  # type: ignore[union-attr]
    assert await indexing.catch_up() == (0, 0)  # type: ignore[union-attr]
    assert await sources_of(library, gone) == []
    assert len(await sources_of(library, hidden)) == 1 and len(await sources_of(library, kept)) == 1
    marks = {m.channel_id for m in await harness.bot.jobs.seen_marks()}
    assert harness.channel_ids["random"] not in marks and harness.channel_ids["general"] in marks
    # The deleted channel is settled: the next connection asks about the missing one alone,
    calls = len(harness.world.calls)
    await indexing.on_connect()  # type: ignore[union-attr]
    await indexing.catch_up()  # type: ignore[union-attr]
    asked = [c for c in harness.world.calls[calls:] if c.startswith("get_channel")]
    assert asked == [f"get_channel {harness.channel_ids['general']}"]
    # and a thread it knows (archived ones are missing from the cache) is not asked about at all.
    general = harness.channel_ids["general"]
    await harness.bot.jobs.remember_thread(KnownThread(general, harness.channel_ids["photos"], harness.guild_id, False, None))
    calls = len(harness.world.calls)
    await indexing.on_connect()  # type: ignore[union-attr]
    await indexing.catch_up()  # type: ignore[union-attr]
    assert not [c for c in harness.world.calls[calls:] if c.startswith("get_channel")]
    assert len(await sources_of(library, hidden)) == 1


async def test_threads_that_archived_while_the_bot_was_away_are_caught_up_after_a_new_session(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """An archived thread is not in the cache, so only listing the archived threads finds those
    that took photos and then archived while the bot was away. The listing comes most recently
    archived first, and stops at the first thread archived before the bot went: that one and
    older are a backfill's."""
    harness = await start_bot(LAYOUT)
    watched = harness.add_thread("photos", "trip", cached=True)
    await harness.post("trip", "ann", "packing now")
    long_ago = harness.add_thread("photos", "last-summer", archived_at="2024-08-01T00:00:00+00:00")
    harness.post_while_away("last-summer", "ann", "", [("old.jpg", scene_jpeg("blue", "circle"))])
    harness.add_thread("photos", "the-year-before", archived_at="2023-08-01T00:00:00+00:00")

    now = datetime.now(timezone.utc)
    missed = [harness.post_while_away("trip", "ann", "", [("trip.jpg", scene_jpeg("blue", "circle"))])]
    watched["thread_metadata"].update(archived=True, archive_timestamp=now.isoformat())
    harness.guild._remove_thread(discord.Object(int(watched["id"])))
    unseen = harness.add_thread("photos", "offsite", archived_at=(now + timedelta(seconds=1)).isoformat())
    missed.append(harness.post_while_away("offsite", "ann", "", [("offsite.jpg", scene_jpeg("blue", "circle"))]))
    harness.world.archived_page = 1
    calls = len(harness.world.calls)

    indexing = harness.bot.get_cog("Indexing")
    await indexing.on_connect()  # type: ignore[union-attr]
    await indexing.on_ready()  # type: ignore[union-attr]
    assert await indexing._catching_up == (2, 2)  # type: ignore[union-attr]
    listed = [c for c in harness.world.calls[calls:] if c == f"archived_threads {harness.channel_ids['photos']}"]
    assert len(listed) == 3  # offsite, trip, last-summer: a page each, and no further
    await harness.drain()
    indexed = await library.catalog.sources_for_messages([*missed, int(long_ago["last_message_id"])])
    assert sorted(s.message_id for s in indexed) == sorted(missed)
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[int(watched["id"])] == missed[0] and marks[int(unseen["id"])] == missed[1]
    assert int(long_ago["id"]) not in marks
    # Caught up, the thread is free again: reopened, a live post moves its mark at once.
    watched["thread_metadata"]["archived"] = False
    harness.guild._add_thread(discord.Thread(guild=harness.guild, state=harness.bot._connection, data=watched))  # type: ignore[arg-type]
    live = await harness.post("trip", "ann", "back home")
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[int(watched["id"])] == live.id
    # A resumed session replays what it missed: no listing then.
    calls = len(harness.world.calls)
    await indexing.on_connect()  # type: ignore[union-attr]
    assert await indexing.catch_up() == (0, 0)  # type: ignore[union-attr]
    assert not any(c.startswith("archived_threads") for c in harness.world.calls[calls:])


async def test_a_post_opened_while_the_bot_was_away_is_read_from_its_opening_message(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """A forum post's opening message has its thread's own id, and Discord reads history *after*
    an id: reading a new thread from its id would skip the photos the post opened with."""
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", "seen before going away")
    harness.add_thread("photos", "open-post", cached=True)
    now = datetime.now(timezone.utc)
    harness.add_thread("photos", "archived-post", archived_at=(now + timedelta(seconds=1)).isoformat())
    opening = [
        harness.post_while_away(name, "ann", "look", [(f"{name}.jpg", scene_jpeg("red", "circle"))], opening=True)
        for name in ("open-post", "archived-post")
    ]
    assert opening == [harness.channel_ids["open-post"], harness.channel_ids["archived-post"]]

    indexing = harness.bot.get_cog("Indexing")
    await indexing.on_connect()  # type: ignore[union-attr]
    await indexing.on_ready()  # type: ignore[union-attr]
    await indexing._catching_up  # type: ignore[union-attr]
    await harness.drain()
    indexed = await library.catalog.sources_for_messages(opening)
    assert sorted(s.message_id for s in indexed) == sorted(opening)


async def test_private_threads_the_bot_is_in_are_caught_up_too(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """Without Manage Threads, the bot lists the private archived threads it is in: the only ones
    it could read. That listing comes by id, not archive time, so it is read through, skipping
    the threads archived before the bot went away instead of stopping at the first."""
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", "still here")
    bot_id = int(harness.world.bot_user["id"])
    now = datetime.now(timezone.utc)
    joined = harness.add_thread("photos", "plans", private=True, archived_at=(now + timedelta(seconds=1)).isoformat())
    not_in = harness.add_thread("photos", "secret", private=True, archived_at=(now + timedelta(seconds=2)).isoformat())
    older = harness.add_thread("photos", "old-plans", private=True, archived_at="2024-08-01T00:00:00+00:00")
    harness.world.thread_members[int(joined["id"])].add(bot_id)
    harness.world.thread_members[int(older["id"])].add(bot_id)  # listed first: the newest id
    missed = harness.post_while_away("plans", "ann", "", [("plans.jpg", scene_jpeg("blue", "circle"))])
    others = [harness.post_while_away("secret", "ann", "", [("secret.jpg", scene_jpeg("red", "star"))]),
              harness.post_while_away("old-plans", "ann", "", [("old.jpg", scene_jpeg("green", "triangle"))])]
    calls = len(harness.world.calls)

    indexing = harness.bot.get_cog("Indexing")
    await indexing.on_connect()  # type: ignore[union-attr]
    await indexing.on_ready()  # type: ignore[union-attr]
    assert await indexing._catching_up == (1, 1)  # type: ignore[union-attr]
    photos = harness.channel_ids["photos"]
    assert f"joined_private_archived_threads {photos}" in harness.world.calls[calls:]
    assert f"private_archived_threads {photos}" not in harness.world.calls[calls:]  # needs Manage Threads
    await harness.drain()
    indexed = await library.catalog.sources_for_messages([missed, *others])
    assert [s.message_id for s in indexed] == [missed]
    known = {t.thread_id: t for t in await harness.bot.jobs.known_threads(harness.guild_id)}
    assert known[int(joined["id"])].private and known[int(joined["id"])].owner_id == harness.user_ids["ann"]
    assert int(not_in["id"]) not in known


async def test_a_thread_is_watched_from_its_creation_and_takes_its_photos_when_deleted(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT)
    thread = await harness.create_thread("photos", "trip")
    thread_id = int(thread["id"])
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[thread_id] == thread_id  # a catch-up would read it from its first message
    posted = await harness.post("trip", "ann", "the lake", files=[("lake.jpg", scene_jpeg("blue", "circle"))])
    await harness.drain()
    assert [s.channel_id for s in await library.catalog.sources_for_messages([posted.id])] == [thread_id]
    assert [t.thread_id for t in await harness.bot.jobs.known_threads()] == [thread_id]

    await harness.delete_channel("trip")
    assert await library.catalog.sources_for_messages([posted.id]) == []
    assert thread_id not in {m.channel_id for m in await harness.bot.jobs.seen_marks()}
    assert await harness.bot.jobs.known_threads() == []
