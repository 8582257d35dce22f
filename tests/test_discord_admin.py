"""The `/shoebox` admin commands and "Forget these photos", driven as real interactions.

Discord hides `/shoebox` from members without Manage Server (`default_permissions`), but a server
can override that, so the bot checks again at run time; both are tested. Long jobs report progress
by editing one ephemeral message.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import discord
import pytest

from bot.cogs.admin import HIDDEN_CHANNEL, SHARED_REINDEX, fit_lines
from bot.cogs.indexing import jobs_for
from bot.jobs import BackfillState
from store.library import Library
from tests.discord_harness import (
    ChannelSpec,
    Harness,
    Layout,
    Sent,
    StartBot,
    allow,
    deny,
    scene_jpeg,
    start_bot,  # noqa: F401 - fixture
)

LAYOUT = Layout(
    roles={"admin": discord.Permissions(manage_guild=True), "mods": discord.Permissions(manage_messages=True)},
    channels=[ChannelSpec("general"), ChannelSpec("photos"), ChannelSpec("old")],
    members={"boss": ["admin"], "mod": ["mods"], "ann": [], "ben": []},
)

SUBCOMMANDS = {
    "status": [],
    "reindex": [],
    "backfill": [],
    "channels": [{"name": "action", "type": 3, "value": "list"}],
    "forget": [{"name": "link", "type": 3, "value": "https://discord.com/channels/1/2/3"}],
}


def texts(sent: list[Sent]) -> list[str]:
    return [s.content or "" for s in sent]


async def test_commands_on_the_tree(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    tree = harness.bot.tree
    group = tree.get_command("shoebox")
    assert isinstance(group, discord.app_commands.Group)
    assert group.default_permissions == discord.Permissions(manage_guild=True)
    assert group.guild_only is True
    assert {c.name for c in group.commands} == set(SUBCOMMANDS)
    payload = group.to_dict(tree)  # what Discord is told when the commands are synced
    assert int(payload["default_member_permissions"]) == discord.Permissions(manage_guild=True).value
    assert payload["dm_permission"] is False
    ask = tree.get_command("ask")
    assert ask is not None and ask.default_permissions is None  # for everyone
    menu = tree.get_command("Forget these photos", type=discord.AppCommandType.message)
    assert menu is not None and menu.default_permissions is None and menu.guild_only


@pytest.mark.parametrize("subcommand", sorted(SUBCOMMANDS))
async def test_non_admins_are_refused_at_run_time(start_bot: StartBot, subcommand: str) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    assert not harness.permissions("mod", "general").manage_guild
    sent = await harness.slash("mod", "general", f"shoebox {subcommand}", SUBCOMMANDS[subcommand])
    assert len(sent) == 1
    assert sent[0].ephemeral
    assert "Manage Server" in (sent[0].content or "")


async def test_status_for_an_admin(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("photos", "ann", files=[("a.jpg", scene_jpeg("red", "circle")),
                                               ("b.txt", b"just some text, not a photo")])
    await harness.drain()
    sent = await harness.slash("boss", "general", "shoebox status")
    (status,) = [s for s in sent if s.kind == "followup"]
    assert status.ephemeral
    content = status.content or ""
    assert "Photos from this server: **1**" in content
    assert harness.bot.library.embedder.model_id in content
    assert "Queue: 0 waiting" in content and "1 indexed" in content and "1 not photos" in content
    assert "could not index b.txt" in content  # the text file, with the decoder's reason


async def test_status_shows_only_this_servers_figures_and_problems(start_bot: StartBot) -> None:  # noqa: F811
    """Each server's admins see their own server: another server's file names, messages and
    counts are not theirs to read."""
    harness = await start_bot(LAYOUT)
    home = harness.guild_view()
    elsewhere = harness.add_guild(Layout(channels=[ChannelSpec("family")], members={"bob": []}), "Bob's family")
    harness.use_guild(elsewhere)
    await harness.post("family", "bob", files=[("divorce-papers.txt", b"not a photo"),
                                               ("kids.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    harness.use_guild(home)
    await harness.post("photos", "ann", files=[("ours.txt", b"not a photo either")])
    await harness.drain()
    sent = await harness.slash("boss", "general", "shoebox status")
    content = "\n".join(texts(sent))
    assert "divorce-papers" not in content and "kids.jpg" not in content
    assert "could not index ours.txt" in content
    assert "Photos from this server: **0**" in content and "library total" not in content
    assert "0 indexed" in content and "1 not photos" in content


async def test_exclude_remove_include_and_clear_channel_rules(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("old", "ann", files=[("o.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    old = harness.channel_ids["old"]
    sent = await harness.slash("boss", "general", "shoebox channels", [
        {"name": "action", "type": 3, "value": "exclude"}, {"name": "channel", "type": 7, "value": str(old)},
    ], resolved={"channels": {str(old): _resolved_channel(harness, "old")}})
    reply = texts(sent)[-1]
    assert "Excluded" in reply and "1 photo(s)" in reply and f"exclude <#{old}>" in reply
    assert await library.catalog.find_sources("channel_id", old) == []
    assert await harness.bot.jobs.rules(harness.guild_id) == {harness.guild_id: {old: "exclude"}}  # kept on disk
    after = await harness.post("old", "ann", files=[("n.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    assert await library.catalog.sources_for_messages([after.id]) == []

    async def rule(action: str, name: str) -> str:
        channel_id = harness.channel_ids[name]
        sent = await harness.slash("boss", "general", "shoebox channels", [
            {"name": "action", "type": 3, "value": action}, {"name": "channel", "type": 7, "value": str(channel_id)},
        ], resolved={"channels": {str(channel_id): _resolved_channel(harness, name)}})
        return texts(sent)[-1]

    assert f"Removed the rule for <#{old}>" in await rule("remove", "old")
    assert await harness.bot.jobs.rules(harness.guild_id) == {}
    # With an include rule, only included channels are indexed.
    assert "only included channels are indexed" in await rule("include", "photos")
    posted = [await harness.post(name, "ann", files=[(f"{name}.jpg", scene_jpeg("green", "circle", seed=n))])
              for n, name in enumerate(("old", "photos"))]
    await harness.drain()
    indexed = await library.catalog.sources_for_messages([m.id for m in posted])
    assert [s.channel_id for s in indexed] == [harness.channel_ids["photos"]]
    sent = await harness.slash("boss", "general", "shoebox channels", [{"name": "action", "type": 3, "value": "include"}])
    assert texts(sent) == ["Name the channel to include."]
    sent = await harness.slash("boss", "general", "shoebox channels", [{"name": "action", "type": 3, "value": "clear"}])
    assert "every channel" in texts(sent)[-1]
    assert await harness.bot.jobs.rules(harness.guild_id) == {}


def _resolved_channel(harness: Harness, name: str) -> dict:
    channel = harness.world.channels[harness.channel_ids[name]]
    return {"id": channel["id"], "name": channel["name"], "type": 0, "permissions": str(discord.Permissions.all().value),
            "guild_id": str(harness.guild_id), "parent_id": None}


async def test_forget_by_message_link(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    message = await harness.post("photos", "ann", files=[("a.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    link = f"https://discord.com/channels/{harness.guild_id}/{message.channel.id}/{message.id}"
    sent = await harness.slash("boss", "general", "shoebox forget", [{"name": "link", "type": 3, "value": link}])
    assert texts(sent)[-1] == "Forgot 1 photo(s) from that message."
    assert await library.catalog.sources_for_messages([message.id]) == []
    for typo in ("nope", f"https://discord.com/channels/{harness.guild_id}/{message.channel.id}/{message.id}0000"):
        sent = await harness.slash("boss", "general", "shoebox forget", [{"name": "link", "type": 3, "value": typo}])
        assert texts(sent) == ["That is not a message link."]
    other = f"https://discord.com/channels/999/{message.channel.id}/{message.id}"
    sent = await harness.slash("boss", "general", "shoebox forget", [{"name": "link", "type": 3, "value": other}])
    assert texts(sent) == ["That message is not in this server."]


async def test_forget_touches_only_this_servers_photos(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """A link names its server and its message separately: a manager of one server who pastes
    their own server's id beside another server's message id must not make that photo go."""
    harness = await start_bot(LAYOUT)
    home = harness.guild_view()
    elsewhere = harness.add_guild(Layout(channels=[ChannelSpec("family")], members={"bob": []}), "Bob's family")
    harness.use_guild(elsewhere)
    message = await harness.post("family", "bob", files=[("kids.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    assert [s.guild_id for s in await library.catalog.sources_for_messages([message.id])] == [elsewhere.guild_id]
    harness.use_guild(home)
    forged = f"https://discord.com/channels/{home.guild_id}/{home.channel_ids['general']}/{message.id}"
    sent = await harness.slash("boss", "general", "shoebox forget", [{"name": "link", "type": 3, "value": forged}])
    # The same reply as for a message that never had photos: nothing about the other server.
    assert texts(sent)[-1] == "I had no photos from that message."
    assert len(await library.catalog.sources_for_messages([message.id])) == 1


@pytest.mark.parametrize("who, allowed", [("ann", True), ("mod", True), ("ben", False), ("boss", False)])
async def test_forget_these_photos(start_bot: StartBot, library: Library, who: str, allowed: bool) -> None:  # noqa: F811
    """The author or a moderator (Manage Messages) may; anyone else, even a server manager, is refused."""
    harness = await start_bot(LAYOUT)
    message = await harness.post("photos", "ann", files=[("a.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    sent = await harness.message_command(who, "photos", "Forget these photos", message)
    assert all(s.ephemeral for s in sent)
    remaining = await library.catalog.sources_for_messages([message.id])
    if allowed:
        assert remaining == [] and "forgot 1 photo" in texts(sent)[-1]
    else:
        assert len(remaining) == 1
        assert texts(sent) == ["Sorry, only the person who posted these photos or a moderator can make me forget them."]
    # A backfill passing by the message later must not bring forgotten photos back.
    photos = harness.channel_ids["photos"]
    await harness.slash("boss", "general", "shoebox backfill", [{"name": "channel", "type": 7, "value": str(photos)}],
                        resolved={"channels": {str(photos): _resolved_channel(harness, "photos")}})
    await harness.drain()
    assert len(await library.catalog.sources_for_messages([message.id])) == (0 if allowed else 1)


async def test_backfill_is_resumable_and_reports_progress_in_one_message(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    channel_id = harness.channel_ids["old"]
    user = harness.world.users[harness.user_ids["ann"]]
    member = harness.world.members[(harness.guild_id, harness.user_ids["ann"])]
    photo_ids = []
    for n in range(230):  # posted while the bot was away: in the history, never seen live
        files = [harness.upload(f"{n}.jpg", scene_jpeg("red" if n % 2 else "blue", "square", seed=n))] if n % 23 == 0 else []
        data = harness.http.world_message(channel_id, user, f"message {n}", guild_id=harness.guild_id,
                                          member=member, attachments=files)
        if files:
            photo_ids.append(int(data["id"]))
    options = [{"name": "channel", "type": 7, "value": str(channel_id)}, {"name": "limit", "type": 4, "value": 150}]
    resolved = {"channels": {str(channel_id): _resolved_channel(harness, "old")}}
    sent = await harness.slash("boss", "general", "shoebox backfill", options, resolved=resolved)
    assert sent[0].kind == "interaction" and sent[0].ephemeral
    assert all(s.kind == "edit" for s in sent[1:]) and len(sent) >= 3  # progress edits one message
    assert "150 messages scanned" in texts(sent)[-1] and "stopped: `/shoebox backfill` goes on from here" in texts(sent)[-1]
    state = await harness.bot.jobs.backfill_state(channel_id)
    assert state is not None and state.scanned == 150 and not state.done
    # Its newest message is where a restart catches up from.
    marks = {m.channel_id: m.newest_id for m in await harness.bot.jobs.seen_marks()}
    assert marks[channel_id] == max(harness.world.messages[channel_id])
    first_calls = [c for c in harness.world.calls if c.startswith(f"logs_from {channel_id}")]
    assert first_calls[0].endswith("before=None limit=100")
    status = "\n".join(texts(await harness.slash("boss", "general", "shoebox status")))
    assert f"Backfill <#{channel_id}>: 150 messages scanned" in status
    assert "in progress" not in status and "stopped: `/shoebox backfill` goes on from here" in status

    sent = await harness.slash("boss", "general", "shoebox backfill", options, resolved=resolved)
    assert "230 messages scanned" in texts(sent)[-1] and "(done)" in texts(sent)[-1]
    resumed = [c for c in harness.world.calls if c.startswith(f"logs_from {channel_id}")][len(first_calls)]
    assert f"before={state.before_id} " in resumed  # continued below the oldest message already scanned
    await harness.drain()
    indexed = await library.catalog.sources_for_messages(photo_ids)
    assert sorted(s.message_id for s in indexed) == sorted(photo_ids)
    assert harness.world.reactions == []  # no reactions on old messages
    calls = len(harness.world.calls)
    sent = await harness.slash("boss", "general", "shoebox backfill", options, resolved=resolved)
    assert "(done)" in texts(sent)[-1]
    assert not any(c.startswith("logs_from") for c in harness.world.calls[calls:])  # finished: not scanned again


async def test_reindex_edits_one_message_with_progress(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    for n, colour in enumerate(["red", "blue", "green"]):
        await harness.post("photos", "ann", files=[(f"{n}.jpg", scene_jpeg(colour, "circle"))])
    await harness.drain()
    before = library.vectors.count
    sent = await harness.slash("boss", "general", "shoebox reindex")
    assert sent[0].kind == "interaction" and sent[0].ephemeral
    assert all(s.kind == "edit" for s in sent[1:])
    assert texts(sent)[-1].startswith("Re-indexed 3 photos with")
    assert library.vectors.count == before == 3


async def test_a_reindex_that_would_touch_other_servers_is_for_the_bots_owner(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    layout = Layout(roles={"admin": discord.Permissions(manage_guild=True)}, channels=[ChannelSpec("general")],
                    members={"boss": ["admin"], "deputy": ["admin"]})
    harness = await start_bot(layout)
    await harness.post("general", "boss", files=[("a.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    harness.add_guild(LAYOUT, "elsewhere")
    harness.world.app_owner = harness.user_ids["boss"]
    sent = await harness.slash("deputy", "general", "shoebox reindex")
    assert texts(sent) == [SHARED_REINDEX]
    sent = await harness.slash("boss", "general", "shoebox reindex")
    assert texts(sent)[-1].startswith("Re-indexed 1 photos with")


async def test_status_shows_a_reindex_under_way(start_bot: StartBot) -> None:  # noqa: F811
    """After 15 minutes the reindex's own message can no longer be edited: status tells instead,
    as a share of the work, since the photos it counts are every server's."""
    harness = await start_bot(LAYOUT)
    admin = harness.bot.get_cog("Admin")
    admin._reindex_progress = (1200, 5000)  # type: ignore[union-attr]
    status = texts(await harness.slash("boss", "general", "shoebox status"))[-1]
    assert "Re-index: running, 24% done (new photos wait for it)" in status
    assert "5,000" not in status and "1,200" not in status


async def test_two_admins_asking_for_a_reindex_at_once_get_one(
    start_bot: StartBot, library: Library, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Answering an interaction is a trip to Discord; a second admin whose command arrives during
    the first one's trip is told a re-index is running, instead of queueing a second one."""
    layout = Layout(roles={"admin": discord.Permissions(manage_guild=True)}, channels=[ChannelSpec("general")],
                    members={"boss": ["admin"], "deputy": ["admin"]})
    harness = await start_bot(layout)
    await harness.post("general", "boss", files=[("a.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    answer = harness.adapter.request

    async def over_the_network(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(0.05)
        return await answer(*args, **kwargs)

    monkeypatch.setattr(harness.adapter, "request", over_the_network)
    runs: list[int] = []
    reindex = library.reindex

    async def counted(*args: object, **kwargs: object) -> int:
        runs.append(1)
        return await reindex(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(library, "reindex", counted)
    sent = await harness.slash_together([("boss", "general", "shoebox reindex"), ("deputy", "general", "shoebox reindex")])
    assert len(runs) == 1
    assert "A re-index is already running." in texts(sent)
    assert texts(sent)[-1].startswith("Re-indexed 1 photos with")


def archived_thread_with_a_photo(harness: Harness, parent: str, name: str) -> tuple[int, dict, int]:
    """A public thread of `parent`, archived long ago (so not in the bot's cache), in which Ann
    posted a photo: (its id, its payload, the message id)."""
    thread = harness.add_thread(parent, name, archived_at="2024-08-01T00:00:00+00:00")
    posted = harness.post_while_away(name, "ann", "the lake", [("lake.jpg", scene_jpeg("blue", "circle"))])
    return int(thread["id"]), thread, posted


async def test_a_backfill_of_the_whole_server_takes_in_archived_threads(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    thread_id, _, posted = archived_thread_with_a_photo(harness, "photos", "summer-trip")
    sent = await harness.slash("boss", "general", "shoebox backfill")
    assert "1 messages scanned" in "\n".join(texts(sent))
    assert f"archived_threads {harness.channel_ids['photos']}" in harness.world.calls
    await harness.drain()
    assert [s.channel_id for s in await library.catalog.sources_for_messages([posted])] == [thread_id]
    assert [t.thread_id for t in await harness.bot.jobs.known_threads(harness.guild_id)] == [thread_id]


async def test_a_dropped_connection_stops_one_channel_of_a_whole_server_backfill_not_all(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT)
    posted = {name: harness.post_while_away(name, "ann", "", [(f"{name}.jpg", scene_jpeg("red", "circle"))])
              for name in ("old", "photos")}
    harness.world.history_resets.add(harness.channel_ids["old"])
    sent = await harness.slash("boss", "general", "shoebox backfill")
    summary = texts(sent)[-1]
    assert f"<#{harness.channel_ids['old']}>: stopped (connection lost); run it again to resume" in summary
    await harness.drain()
    indexed = await library.catalog.sources_for_messages(list(posted.values()))
    assert [s.message_id for s in indexed] == [posted["photos"]]


async def test_a_backfill_reads_private_archived_threads_and_names_them_only_to_their_readers(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """With Manage Threads the bot lists every private archived thread. The server manager who
    runs the backfill is not in Ann's private thread and may not manage threads, so it is
    reported to them only as a channel they cannot view, with no counts; its photo is indexed all
    the same, and stays Ann's to find."""
    layout = Layout(roles=LAYOUT.roles, members=LAYOUT.members,
                    channels=[ChannelSpec("general"), ChannelSpec("photos", {"Shoebox": allow(manage_threads=True)})])
    harness = await start_bot(layout)
    thread = harness.add_thread("photos", "plans", owner="ann", private=True, archived_at="2024-08-01T00:00:00+00:00")
    posted = harness.post_while_away("plans", "ann", "the lake", [("lake.jpg", scene_jpeg("blue", "circle"))])
    sent = await harness.slash("boss", "general", "shoebox backfill")
    assert f"private_archived_threads {harness.channel_ids['photos']}" in harness.world.calls
    report = texts(sent)[-1]
    assert f"<#{thread['id']}>" not in report and "plans" not in report
    assert f"{HIDDEN_CHANNEL}: done" in report, report
    await harness.drain()
    assert [s.channel_id for s in await library.catalog.sources_for_messages([posted])] == [int(thread["id"])]
    [known] = await harness.bot.jobs.known_threads(harness.guild_id)
    assert known.private and known.owner_id == harness.user_ids["ann"]


async def test_a_whole_server_backfill_forgets_threads_deleted_while_the_bot_was_away(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """A deleted thread sends no event to a bot that is away, and a known thread missing from the
    cache may only have archived. A whole-server backfill lists every archived thread: a known one
    in none of its parent's listings is asked about, and forgotten once Discord says it is gone;
    while a parent cannot be listed, nothing of it is judged."""
    harness = await start_bot(LAYOUT)
    kept, _, kept_post = archived_thread_with_a_photo(harness, "photos", "summer-trip")
    gone, _, gone_post = archived_thread_with_a_photo(harness, "photos", "old-plans")
    await harness.slash("boss", "general", "shoebox backfill")
    await harness.drain()
    assert len(await library.catalog.sources_for_messages([kept_post, gone_post])) == 2
    del harness.world.channels[gone]  # deleted while the bot was away

    harness.world.archived_failures.add(harness.channel_ids["photos"])
    await harness.slash("boss", "general", "shoebox backfill")
    assert f"get_channel {gone}" not in harness.world.calls
    assert len(await library.catalog.sources_for_messages([kept_post, gone_post])) == 2

    harness.world.archived_failures.clear()
    calls = len(harness.world.calls)
    await harness.slash("boss", "general", "shoebox backfill")
    await harness.drain()
    asked = [c for c in harness.world.calls[calls:] if c.startswith("get_channel")]
    assert asked == [f"get_channel {gone}"]
    assert [s.message_id for s in await library.catalog.sources_for_messages([kept_post, gone_post])] == [kept_post]
    assert [t.thread_id for t in await harness.bot.jobs.known_threads(harness.guild_id)] == [kept]


async def test_backfill_of_an_archived_thread_fetches_it(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """An archived thread is not in the bot's cache, so Discord's pick of it arrives as a bare id
    and name: the bot fetches the thread and backfills it like any other channel."""
    harness = await start_bot(LAYOUT)
    thread_id, thread, posted = archived_thread_with_a_photo(harness, "photos", "summer-trip")
    resolved = {"channels": {str(thread_id): {**thread, "permissions": str(discord.Permissions.all().value)}}}
    sent = await harness.slash("boss", "general", "shoebox backfill",
                               [{"name": "channel", "type": 7, "value": str(thread_id)}], resolved=resolved)
    assert not any("AppCommand" in t or "ChannelType" in t for t in texts(sent))
    assert "1 messages scanned" in texts(sent)[-1] and "(done)" in texts(sent)[-1]
    await harness.drain()
    assert [s.channel_id for s in await library.catalog.sources_for_messages([posted])] == [thread_id]

    # One that cannot be fetched any more gets a sentence with its name, not an object's repr.
    del harness.world.channels[thread_id]
    sent = await harness.slash("boss", "general", "shoebox backfill",
                               [{"name": "channel", "type": 7, "value": str(thread_id)}], resolved=resolved)
    assert texts(sent) == ["I can't reach summer-trip right now: check that I can see it, then try again."]


async def test_a_backfill_with_nothing_to_read_says_so_after_answering_at_once(start_bot: StartBot) -> None:  # noqa: F811
    """Looking for channels and archived threads takes a request per channel: the command answers
    first (Discord allows 3 s), then edits its answer."""
    hidden = {"@everyone": deny(view_channel=True), "admin": allow(view_channel=True)}
    layout = Layout(roles={"admin": discord.Permissions(manage_guild=True)},
                    channels=[ChannelSpec("general", hidden), ChannelSpec("photos", hidden)], members={"boss": ["admin"]})
    harness = await start_bot(layout)
    sent = await harness.slash("boss", "general", "shoebox backfill")
    assert [(s.kind, s.content) for s in sent] == [
        ("interaction", "Backfill: looking for channels and threads…"),
        ("edit", "There is no channel here I can read."),
    ]


async def test_admin_views_leave_out_channels_the_admin_cannot_view(start_bot: StartBot) -> None:  # noqa: F811
    """Managing the server does not open every channel: a file name from a staff channel, or its
    backfill counts, are not shown to an admin who cannot view it, but are to one who can."""
    staff_only = {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True),
                  "Shoebox": allow(view_channel=True)}
    layout = Layout(
        roles={"admin": discord.Permissions(manage_guild=True), "staff": discord.Permissions()},
        channels=[ChannelSpec("general"), ChannelSpec("staff-room", staff_only)],
        members={"boss": ["admin"], "chief": ["admin", "staff"], "ann": ["staff"]},
    )
    harness = await start_bot(layout)
    await harness.post("staff-room", "ann", files=[("layoff-list.txt", b"not a photo")])
    await harness.post("general", "ann", files=[("menu.txt", b"not a photo either")])
    await harness.drain()
    secret = harness.channel_ids["staff-room"]

    backfill = "\n".join(texts(await harness.slash("boss", "general", "shoebox backfill")))
    assert f"<#{secret}>" not in backfill and "a channel you cannot view: done" in backfill
    assert f"<#{harness.channel_ids['general']}>: 1 messages scanned" in backfill

    # A problem kept before problems carried their channel cannot be placed: shown to no one.
    await harness.bot.jobs.conn.execute(
        "INSERT INTO errors (at, place, message, guild_id) VALUES ('2026-01-01T00:00:00+00:00', 'index', "
        "'could not index payroll.txt', ?)", (harness.guild_id,),
    )
    status = "\n".join(texts(await harness.slash("boss", "general", "shoebox status")))
    assert "layoff-list" not in status and f"<#{secret}>" not in status and "payroll" not in status
    assert "could not index menu.txt" in status
    status = "\n".join(texts(await harness.slash("chief", "general", "shoebox status")))
    assert "could not index layoff-list.txt" in status and f"Backfill <#{secret}>: 1 messages scanned" in status


def test_unseen_between_takes_the_stretch_from_lower_up_to_upper() -> None:
    from bot.cogs.indexing import unseen_between

    indexed = [10, 20, 30, 40, 50]
    assert unseen_between(indexed, 20, 50, {20, 40}) == [30]  # 50 is above the stretch
    assert unseen_between(indexed, 0, 25, set()) == [10, 20]
    assert unseen_between(indexed, 60, 99, set()) == []


async def test_a_fresh_backfill_forgets_photos_of_messages_deleted_while_the_bot_was_away(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """No delete event reaches a stopped bot; walking the history again shows the messages that
    are gone (in every page, and under the last one), and their photos leave the index."""
    harness = await start_bot(LAYOUT)
    channel_id = harness.channel_ids["old"]
    user = harness.world.users[harness.user_ids["ann"]]
    member = harness.world.members[(harness.guild_id, harness.user_ids["ann"])]
    photos = []
    last_week = discord.utils.utcnow() - timedelta(days=7)
    for n in range(250):
        files = [harness.upload(f"{n}.jpg", scene_jpeg("red" if n % 2 else "blue", "star", seed=n))] if n % 25 == 0 else []
        data = harness.http.world_message(channel_id, user, f"message {n}", guild_id=harness.guild_id, member=member,
                                          attachments=files,
                                          message_id=discord.utils.time_snowflake(last_week + timedelta(minutes=n)))
        if files:
            photos.append(int(data["id"]))
    options = [{"name": "channel", "type": 7, "value": str(channel_id)}]
    resolved = {"channels": {str(channel_id): _resolved_channel(harness, "old")}}
    await harness.slash("boss", "general", "shoebox backfill", options, resolved=resolved)
    await harness.drain()
    assert len(await library.catalog.sources_for_messages(photos)) == 10

    # Deleted while the bot was away: the oldest, one in the middle page, and the newest photo.
    deleted = [photos[0], photos[5], photos[9]]
    for message_id in deleted:
        del harness.world.messages[channel_id][message_id]
    restart = [*options, {"name": "restart", "type": 5, "value": True}]
    sent = await harness.slash("boss", "general", "shoebox backfill", restart, resolved=resolved)
    assert "247 messages scanned" in texts(sent)[-1]
    await harness.drain()
    kept = {s.message_id for s in await library.catalog.sources_for_messages(photos)}
    assert kept == set(photos) - set(deleted)


async def test_a_page_in_hand_when_the_bot_leaves_its_server_is_dropped(start_bot: StartBot, library: Library) -> None:  # noqa: F811
    """A backfill waits for room in the queue with a page in hand; leaving the server meanwhile
    forgets everything about it, and the page must not be queued (nor its progress kept) after."""
    harness = await start_bot(LAYOUT)
    indexing = harness.bot.get_cog("Indexing")
    channel = harness.guild.get_channel(harness.channel_ids["old"])
    message = await harness.post("old", "ann", "", [("a.jpg", scene_jpeg("red", "circle"))])
    page = jobs_for(message, react=False)
    state = BackfillState(channel.id, harness.guild_id, None)  # type: ignore[union-attr]
    await harness.remove_bot_from_guild()
    assert await indexing._save_step(state, page, 1, message.id, False, None)  # type: ignore[union-attr]
    assert await indexing.queue.pending(harness.guild_id) == 0  # type: ignore[union-attr]
    assert await harness.bot.jobs.backfill_state(channel.id) is None  # type: ignore[union-attr]


async def test_a_page_in_hand_from_an_archived_thread_is_dropped_once_its_parent_is_excluded(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """An archived thread is not in the cache, so only the backfill reading it knows its parent:
    a page it holds while the queue is full must not be queued once the parent is excluded."""
    harness = await start_bot(LAYOUT)
    thread_id, _, posted = archived_thread_with_a_photo(harness, "photos", "summer-trip")
    indexing = harness.bot.get_cog("Indexing")
    queue = indexing.queue  # type: ignore[union-attr]
    thread = await harness.bot.fetch_channel(thread_id)
    assert harness.guild.get_channel_or_thread(thread_id) is None  # not cached: the case at hand
    settings = queue.settings
    queue.settings = replace(settings, max_pending=0)  # full: the backfill waits with its page
    reading = asyncio.create_task(indexing.backfill(thread))  # type: ignore[union-attr]
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not queue._room.is_set():  # waiting for room
            break
    assert not reading.done() and not queue._room.is_set()
    photos = harness.channel_ids["photos"]
    sent = await harness.slash("boss", "general", "shoebox channels", [
        {"name": "action", "type": 3, "value": "exclude"}, {"name": "channel", "type": 7, "value": str(photos)},
    ], resolved={"channels": {str(photos): _resolved_channel(harness, "photos")}})
    assert "Excluded" in texts(sent)[-1]
    queue.settings = settings
    queue._room.set()
    await asyncio.wait_for(reading, timeout=30)
    assert await queue.pending(harness.guild_id) == 0
    await harness.drain()
    assert await library.catalog.sources_for_messages([posted]) == []


def test_a_long_report_keeps_whole_lines_and_says_how_many_are_left_out() -> None:
    lines = ["Backfill finished; the photos are being indexed now."] + [f"<#{n:019d}>: done" for n in range(200)]
    text = fit_lines(lines)
    assert len(text) <= 2000 and text.endswith(" more")
    shown = text.split("\n")[:-1]
    assert shown == lines[: len(shown)] and text.split("\n")[-1] == f"… and {len(lines) - len(shown)} more"
    assert fit_lines(lines[:3]) == "\n".join(lines[:3])
    assert fit_lines(["x" * 1990, "y" * 5]) == "x" * 1990 + "\n" + "y" * 5  # 1,996 characters: all fit
    assert fit_lines(["z" * 3000, "w"]) == "z" * (2000 - len("\n… and 2 more")) + "\n… and 1 more"


async def test_status_counts_a_photo_already_in_the_library_as_indexed(start_bot: StartBot) -> None:  # noqa: F811
    """The same bytes may already be stored from another server: a server's status must not tell
    its admins so. Their copy is counted as indexed, like any other photo of theirs."""
    harness = await start_bot(LAYOUT)
    home = harness.guild_view()
    elsewhere = harness.add_guild(Layout(channels=[ChannelSpec("family")], members={"bob": []}), "Bob's family")
    harness.use_guild(elsewhere)
    secret = scene_jpeg("green", "triangle")
    await harness.post("family", "bob", files=[("kids.jpg", secret)])
    await harness.drain()
    harness.use_guild(home)
    await harness.post("photos", "boss", files=[("guess.jpg", secret)])
    await harness.drain()
    status = "\n".join(texts(await harness.slash("boss", "general", "shoebox status")))
    assert "Photos from this server: **1**" in status
    assert "since start: 1 indexed, 0 not photos" in status, status
    assert "duplicate" not in status


# Boss manages the server but cannot view #staff-room; Chief manages it and can.
STAFF_ROOM = Layout(
    roles={"admin": discord.Permissions(manage_guild=True), "staff": discord.Permissions()},
    channels=[ChannelSpec("general"), ChannelSpec("staff-room", {
        "@everyone": deny(view_channel=True), "staff": allow(view_channel=True), "Shoebox": allow(view_channel=True)})],
    members={"boss": ["admin"], "chief": ["admin", "staff"], "ann": ["staff"]},
)


async def test_status_figures_leave_out_channels_the_admin_cannot_view(start_bot: StartBot) -> None:  # noqa: F811
    """Photos, the queue and what was indexed since start are counted only in the channels the
    admin can view: a server-wide figure would show a hidden channel's photos, and would move
    each time one is posted there."""
    harness = await start_bot(STAFF_ROOM)
    await harness.post("staff-room", "ann", files=[("x.jpg", scene_jpeg("blue", "star")),
                                                   ("y.txt", b"not a photo")])
    await harness.drain()
    queue = harness.bot.get_cog("Indexing").queue  # type: ignore[union-attr]
    async with queue.paused():  # one more waits in the queue
        await harness.post("staff-room", "ann", files=[("z.jpg", scene_jpeg("red", "heart"))])
        boss = "\n".join(texts(await harness.slash("boss", "general", "shoebox status")))
        chief = "\n".join(texts(await harness.slash("chief", "general", "shoebox status")))
    assert "Photos from this server: **0**" in boss, boss
    assert "Queue: 0 waiting · since start: 0 indexed, 0 not photos" in boss, boss
    assert "Photos from this server: **1**" in chief, chief
    assert "Queue: 1 waiting · since start: 1 indexed, 1 not photos" in chief, chief


async def test_forget_by_link_touches_only_a_message_in_a_channel_the_admin_can_view(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """A link names a channel as well as a message, and anyone can write one. Boss manages the
    server but cannot view #staff-room: a link to a message there, under its own channel or under
    one Boss can view, gets the answer a message without photos gets, and forgets nothing."""
    harness = await start_bot(STAFF_ROOM)
    hidden = await harness.post("staff-room", "ann", files=[("x.jpg", scene_jpeg("blue", "star")),
                                                           ("y.jpg", scene_jpeg("red", "heart"))])
    public = await harness.post("general", "ann", files=[("z.jpg", scene_jpeg("green", "circle"))])
    await harness.drain()

    async def forget(admin: str, channel: str, message_id: int) -> str:
        link = f"https://discord.com/channels/{harness.guild_id}/{harness.channel_ids[channel]}/{message_id}"
        return texts(await harness.slash(admin, "general", "shoebox forget", [{"name": "link", "type": 3, "value": link}]))[-1]

    assert await forget("boss", "staff-room", hidden.id) == "I had no photos from that message."
    assert await forget("boss", "general", hidden.id) == "I had no photos from that message."
    assert len(await library.catalog.sources_for_messages([hidden.id])) == 2
    # Chief views both channels, but a message is only found in the channel it was posted in.
    assert await forget("chief", "staff-room", public.id) == "I had no photos from that message."
    assert len(await library.catalog.sources_for_messages([public.id])) == 1
    assert await forget("chief", "staff-room", hidden.id) == "Forgot 2 photo(s) from that message."
    assert await library.catalog.sources_for_messages([hidden.id]) == []

    # A message not read yet is looked for in its channel, and stays forgotten through a backfill.
    away = harness.post_while_away("general", "ann", "", [("w.jpg", scene_jpeg("red", "square"))])
    assert await forget("boss", "general", away) == "I had no photos from that message."
    general = harness.channel_ids["general"]
    await harness.slash("boss", "general", "shoebox backfill", [{"name": "channel", "type": 7, "value": str(general)}],
                        resolved={"channels": {str(general): _resolved_channel(harness, "general")}})
    await harness.drain()
    assert await library.catalog.sources_for_messages([away]) == []


async def test_excluding_a_category_counts_only_the_photos_the_admin_can_view(
    start_bot: StartBot, library: Library  # noqa: F811
) -> None:
    """Boss excludes the Team category and cannot view #staff-room in it: its two photos are
    forgotten without a word. #general's is counted, although the same bytes posted in #lounge
    keep the stored image: each photo posted is counted, not each image that goes."""
    staff_only = {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True),
                  "Shoebox": allow(view_channel=True)}
    layout = Layout(roles={"admin": discord.Permissions(manage_guild=True), "staff": discord.Permissions()},
                    channels=[ChannelSpec("general", category="team"),
                              ChannelSpec("staff-room", staff_only, category="team"), ChannelSpec("lounge")],
                    members={"boss": ["admin"], "ann": ["staff"]})
    harness = await start_bot(layout)
    shared = scene_jpeg("green", "circle")
    await harness.post("general", "ann", files=[("g.jpg", shared)])
    await harness.post("lounge", "ann", files=[("l.jpg", shared)])
    await harness.post("staff-room", "ann", files=[("x.jpg", scene_jpeg("blue", "star")),
                                                   ("y.jpg", scene_jpeg("red", "heart"))])
    await harness.drain()
    category = harness.channel("general").category
    assert category is not None
    resolved = {"channels": {str(category.id): {"id": str(category.id), "name": "team", "type": 4,
                                                "permissions": str(discord.Permissions.all().value),
                                                "guild_id": str(harness.guild_id), "parent_id": None}}}
    reply = texts(await harness.slash("boss", "general", "shoebox channels", [
        {"name": "action", "type": 3, "value": "exclude"}, {"name": "channel", "type": 7, "value": str(category.id)},
    ], resolved=resolved))[-1]
    assert "and 1 photo(s) from it were forgotten" in reply, reply
    for name in ("general", "staff-room"):
        assert await library.catalog.find_sources("channel_id", harness.channel_ids[name]) == []
    assert len(await library.catalog.find_sources("channel_id", harness.channel_ids["lounge"])) == 1
