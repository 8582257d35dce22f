"""Who sees which photos: a permission matrix of 4 members x 3 channels, through every way of asking.

The server has three channels, each with one photo:

* #general — everyone, except Dan, who has a member overwrite denying him View Channel;
* #staff   — hidden from @everyone, visible to the Staff role;
* #vault   — visible to everyone, but Read Message History is denied to @everyone and allowed to
  the Archivist role: people without it can see new messages there but not scroll back, so they
  must not be shown its old photos either.

Each member asks by mentioning the bot, by DM (scope across shared servers, member fetched over
the API because members are not cached) and with `/ask`; the photos shown must come from exactly
the channels Discord lets that member view AND read the history of — narrowed, for an answer
posted publicly in a channel, to what everyone who reads that channel may see (`PUBLIC`). The answers are in offline
mode, which returns every visible photo (there are fewer than its five results), so a photo from
outside the scope would show up.
"""

from __future__ import annotations


import discord
import pytest

from bot import access
from bot.scope import KnownThread, readable_channel_ids
from tests.discord_harness import (
    ChannelSpec,
    Harness,
    Layout,
    Sent,
    StartBot,
    allow,
    deny,
    scene_jpeg,
    shown_channels,
    start_bot,  # noqa: F401 - fixture
)

LAYOUT = Layout(
    roles={"staff": discord.Permissions.none(), "archivist": discord.Permissions.none()},
    channels=[
        ChannelSpec("general", {"dan": deny(view_channel=True)}),
        ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True)}),
        ChannelSpec("vault", {"@everyone": deny(read_message_history=True), "archivist": allow(read_message_history=True)}),
    ],
    members={"ann": ["staff", "archivist"], "ben": [], "cat": ["archivist"], "dan": ["staff"]},
)

# member -> (channel they ask in, channels whose photos they may be shown)
MATRIX = {
    "ann": ("general", {"general", "staff", "vault"}),
    "ben": ("general", {"general"}),
    "cat": ("general", {"general", "vault"}),
    "dan": ("staff", {"staff"}),
}
PHOTOS = {"general": ("red", "circle"), "staff": ("blue", "star"), "vault": ("green", "triangle")}
# What a public answer in that channel may show: only channels everyone there can read too.
PUBLIC = {"ann": {"general"}, "ben": {"general"}, "cat": {"general"}, "dan": {"staff"}}


async def server_with_photos(start_bot: StartBot) -> Harness:  # noqa: F811
    harness = await start_bot(LAYOUT)
    for channel, (colour, shape) in PHOTOS.items():
        await harness.post(channel, "ann", f"a {colour} {shape}", files=[(f"{shape}.jpg", scene_jpeg(colour, shape))])
    await harness.drain()
    stats = await harness.bot.library.stats()
    assert stats["images"] == 3
    return harness


def shown_files(sent: list[Sent]) -> int:
    return sum(len(message.files) for message in sent)


@pytest.mark.parametrize("channel", sorted(PHOTOS))
@pytest.mark.parametrize("member", sorted(MATRIX))
async def test_scope_cell(start_bot: StartBot, member: str, channel: str) -> None:  # noqa: F811
    """One cell of the matrix: Discord's verdict (view AND read history) is the scope's verdict."""
    harness = await start_bot(LAYOUT)
    permissions = harness.permissions(member, channel)
    discord_says = permissions.view_channel and permissions.read_message_history
    assert discord_says == (channel in MATRIX[member][1]), (member, channel, permissions)
    in_scope = harness.channel_ids[channel] in readable_channel_ids(harness.guild, harness.member(member))
    assert in_scope == discord_says


@pytest.mark.parametrize("member", sorted(MATRIX))
async def test_discord_permissions_decide_what_is_shown(start_bot: StartBot, member: str) -> None:  # noqa: F811
    harness = await server_with_photos(start_bot)
    ask_in, expected = MATRIX[member]

    # 1. Mentioning the bot in a channel.
    before = len(harness.world.sent)
    await harness.post(ask_in, member, "show me the shapes", mention_bot=True)
    sent = harness.sent_since(before)
    assert sent and sent[0].channel_id == harness.channel_ids[ask_in]
    assert shown_channels(harness, sent) == PUBLIC[member]
    assert shown_files(sent) == len(PUBLIC[member])

    # 2. In a DM: the member is looked up over the API (no member cache), then the same rules apply.
    before = len(harness.world.sent)
    await harness.post("", member, "show me the shapes", dm=True)
    sent = harness.sent_since(before)
    assert shown_channels(harness, sent) == expected
    assert f"get_member {harness.guild_id} {harness.user_ids[member]}" in harness.world.calls

    # 3. The /ask slash command, answered privately.
    sent = await harness.slash(member, ask_in, "ask", [
        {"name": "question", "type": 3, "value": "show me the shapes"},
        {"name": "private", "type": 5, "value": True},
    ])
    assert shown_channels(harness, sent) == expected
    assert sent and all(message.ephemeral for message in sent)


async def test_scope_follows_a_permission_change_at_question_time(start_bot: StartBot) -> None:  # noqa: F811
    """Ben is given the Staff role: his very next question sees #staff, with no restart or cache."""
    harness = await server_with_photos(start_bot)
    before = len(harness.world.sent)
    await harness.post("", "ben", "shapes", dm=True)
    assert shown_channels(harness, harness.sent_since(before)) == {"general"}
    key = (harness.guild_id, harness.user_ids["ben"])
    harness.world.members[key]["roles"] = [str(harness.role_ids["staff"])]
    before = len(harness.world.sent)
    await harness.post("", "ben", "shapes", dm=True)
    assert shown_channels(harness, harness.sent_since(before)) == {"general", "staff"}


async def test_a_stranger_in_dms_sees_nothing(start_bot: StartBot) -> None:  # noqa: F811
    """Someone who shares no server with the bot gets an answer with no photos at all."""
    harness = await server_with_photos(start_bot)
    user_id = harness.user_ids["ben"]
    del harness.world.members[(harness.guild_id, user_id)]  # Ben left the server
    before = len(harness.world.sent)
    await harness.post("", "ben", "shapes", dm=True)
    sent = harness.sent_since(before)
    assert sent and shown_files(sent) == 0 and shown_channels(harness, sent) == set()


async def test_archived_threads_follow_their_parent(start_bot: StartBot) -> None:  # noqa: F811
    """Threads out of the cache are judged by the parent remembered at indexing time; a private
    one only by its owner (or people who may manage threads)."""
    harness = await start_bot(LAYOUT)
    general, staff = harness.channel_ids["general"], harness.channel_ids["staff"]
    threads = [
        KnownThread(901, general, harness.guild_id),
        KnownThread(902, general, harness.guild_id, private=True, owner_id=harness.user_ids["ann"]),
        KnownThread(903, staff, harness.guild_id),
        KnownThread(904, 123, harness.guild_id),  # parent deleted: nobody
    ]
    visible = {
        member: readable_channel_ids(harness.guild, harness.member(member), threads) & {901, 902, 903, 904}
        for member in MATRIX
    }
    assert visible == {"ann": {901, 902, 903}, "ben": {901}, "cat": {901}, "dan": {903}}


async def test_a_private_thread_shows_its_owner_only_while_they_are_still_in_it(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """Without the members intent the owner stands in for a private thread's members, so Discord
    is asked whether they are still in it: a moderator can remove even the owner. Removed, or
    unconfirmed because the API failed, the thread's photos are held back."""
    harness = await server_with_photos(start_bot)
    thread = int(harness.add_thread("general", "plans", owner="ben", private=True, cached=True)["id"])
    await harness.post("plans", "ben", "a yellow square", files=[("square.jpg", scene_jpeg("yellow", "square"))])
    await harness.drain()
    assert (await harness.bot.library.stats())["images"] == 4

    async def ben_sees() -> set[str]:
        before = len(harness.world.sent)
        await harness.post("", "ben", "shapes", dm=True)
        return shown_channels(harness, harness.sent_since(before))

    ben = harness.user_ids["ben"]
    asked = len(harness.world.calls)
    assert await ben_sees() == {"general", "plans"}
    assert f"thread_member {thread} {ben}" in harness.world.calls[asked:]
    # Nobody else is asked about: Ann is not the owner, so she never saw the thread in the first place.
    sent = await harness.slash("ann", "general", "ask", [
        {"name": "question", "type": 3, "value": "shapes"}, {"name": "private", "type": 5, "value": True},
    ])
    assert shown_channels(harness, sent) == {"general", "staff", "vault"}

    # A public answer in #general shows no private thread, and one asked inside the thread shows
    # that its asker is in it: neither needs to ask Discord.
    asked = len(harness.world.calls)
    before = len(harness.world.sent)
    await harness.post("general", "ben", "shapes", mention_bot=True)
    assert shown_channels(harness, harness.sent_since(before)) == {"general"}
    before = len(harness.world.sent)
    await harness.post("plans", "ben", "shapes", mention_bot=True)
    assert shown_channels(harness, harness.sent_since(before)) == {"general", "plans"}
    assert not [c for c in harness.world.calls[asked:] if c.startswith("thread_member")]

    harness.world.thread_member_failures = 1
    with caplog.at_level("WARNING", logger="bot.access"):
        assert await ben_sees() == {"general"}
    assert f"Could not confirm that {ben} is still in thread {thread}" in caplog.text

    harness.world.thread_members[thread].discard(ben)  # a moderator removes him
    assert await ben_sees() == {"general"}
    sent = await harness.slash("ben", "general", "ask", [
        {"name": "question", "type": 3, "value": "shapes"}, {"name": "private", "type": 5, "value": True},
    ])
    assert shown_channels(harness, sent) == {"general"}


async def test_an_open_thread_shows_its_photos_to_those_who_read_its_parent(start_bot: StartBot) -> None:  # noqa: F811
    """Open threads are in the cache and judged there, by their parent's permissions."""
    harness = await server_with_photos(start_bot)
    harness.add_thread("staff", "rota", owner="ann", cached=True)
    await harness.post("rota", "ann", "a purple square", files=[("rota.jpg", scene_jpeg("purple", "square"))])
    await harness.drain()
    assert (await harness.bot.library.stats())["images"] == 4
    seen = {}
    for member in ("ann", "ben", "dan"):
        before = len(harness.world.sent)
        await harness.post("", member, "shapes", dm=True)
        seen[member] = shown_channels(harness, harness.sent_since(before))
    assert seen == {"ann": {"general", "staff", "vault", "rota"}, "ben": {"general"}, "dan": {"staff", "rota"}}

    # Asked in the thread itself, the answer is posted there for #staff's audience to read: Dan
    # reads neither #general nor #vault's history, so only the thread and #staff may be shown.
    before = len(harness.world.sent)
    await harness.post("rota", "ann", "show me the shapes", mention_bot=True)
    sent = harness.sent_since(before)
    assert sent and sent[0].channel_id == harness.channel_ids["rota"]
    assert shown_channels(harness, sent) == {"staff", "rota"}


async def test_threads_past_the_lookup_limit_are_held_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Confirming costs a request a thread; past the limit nothing is confirmed, so nothing is shown."""

    class Members:
        asked: list[int] = []

        async def get_thread_member(self, thread_id: int, user_id: int) -> dict:
            self.asked.append(thread_id)
            return {"id": str(thread_id), "user_id": str(user_id)}

    monkeypatch.setattr(access, "MAX_MEMBERSHIP_LOOKUPS", 2)
    http = Members()
    with caplog.at_level("WARNING", logger="bot.access"):
        held = await access.unconfirmed_threads(http, 7, [30, 10, 20])  # type: ignore[arg-type]
    assert held == {30} and sorted(http.asked) == [10, 20]
    assert "owns 3 private threads with photos; only 2 were confirmed" in caplog.text


async def test_asking_inside_a_private_thread_shows_its_photos_to_its_members(start_bot: StartBot) -> None:  # noqa: F811
    """Only the owner is known to be in a private thread; but posting a question in it, or using
    /ask there, takes being in it. Ben was added to Ann's thread: asked there, its photos are his
    to see; asked by DM, nothing tells the bot he is in it."""
    harness = await server_with_photos(start_bot)
    thread = int(harness.add_thread("general", "plans", owner="ann", private=True, cached=True)["id"])
    harness.world.thread_members[thread].add(harness.user_ids["ben"])
    await harness.post("plans", "ben", "a yellow square", files=[("square.jpg", scene_jpeg("yellow", "square"))])
    await harness.drain()

    before = len(harness.world.sent)
    await harness.post("plans", "ben", "shapes", mention_bot=True)
    sent = harness.sent_since(before)
    assert sent[0].channel_id == thread and shown_channels(harness, sent) == {"plans", "general"}
    sent = await harness.slash("ben", "plans", "ask", [
        {"name": "question", "type": 3, "value": "shapes"}, {"name": "private", "type": 5, "value": True},
    ])
    assert shown_channels(harness, sent) == {"plans", "general"}

    before = len(harness.world.sent)
    await harness.post("", "ben", "shapes", dm=True)
    assert shown_channels(harness, harness.sent_since(before)) == {"general"}
