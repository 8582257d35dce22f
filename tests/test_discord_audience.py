"""Public answers only show photos their whole audience could already read.

An answer posted in a server channel is read by everyone in that channel, not just the asker. So
a public answer (a mention or a reply in a channel, `/ask` without `private`) only shows photos
from channels "at least as visible" as the one it is posted in, while a DM or a private `/ask`
keeps the asker's full scope.

The server:

* #general — everyone;
* #staff   — hidden from @everyone, visible to the Staff role;
* #project — hidden from @everyone, visible to the Staff role and to Eve, a contractor with no
  role, through a member-specific overwrite;
* an Admin role with Administrator, which reads everything and so never holds a channel back.

Answers are in offline mode, which returns every photo in scope (there are fewer than its five
results), so a photo from outside the scope would show up.
"""

from __future__ import annotations


import discord

from bot.scope import KnownThread, audience_channel_ids, readable_channel_ids
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
    roles={"staff": discord.Permissions.none(), "admin": discord.Permissions(administrator=True)},
    channels=[
        ChannelSpec("general"),
        ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True)}),
        ChannelSpec("project", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True),
                                "eve": allow(view_channel=True)}),
    ],
    members={"ann": ["staff"], "ben": [], "eve": [], "root": ["admin"]},
)
PHOTOS = {"general": ("red", "circle"), "staff": ("blue", "star"), "project": ("green", "triangle")}
QUESTION = "show me the shapes"


async def server_with_photos(start_bot: StartBot, layout: Layout = LAYOUT) -> Harness:  # noqa: F811
    harness = await start_bot(layout)
    for channel, (colour, shape) in PHOTOS.items():
        if channel in harness.channel_ids:
            files = [(f"{shape}.jpg", scene_jpeg(colour, shape))]
            await harness.post(channel, "root", f"a {colour} {shape}", files=files)
    await harness.drain()
    assert (await harness.bot.library.stats())["images"] == len(harness.channel_ids)
    return harness


async def mention(harness: Harness, member: str, channel: str) -> list[Sent]:
    before = len(harness.world.sent)
    await harness.post(channel, member, QUESTION, mention_bot=True)
    sent = harness.sent_since(before)
    assert sent and all(s.channel_id == harness.channel_ids[channel] for s in sent)
    return sent


async def dm(harness: Harness, member: str) -> list[Sent]:
    before = len(harness.world.sent)
    await harness.post("", member, QUESTION, dm=True)
    sent = harness.sent_since(before)
    assert sent
    return sent


async def slash_ask(harness: Harness, member: str, channel: str, *, private: bool) -> list[Sent]:
    options = [{"name": "question", "type": 3, "value": QUESTION}]
    if private:
        options.append({"name": "private", "type": 5, "value": True})
    sent = await harness.slash(member, channel, "ask", options)
    assert sent and all(s.ephemeral == private for s in sent)
    return sent


async def test_a_public_answer_in_general_never_shows_staff_photos(start_bot: StartBot) -> None:  # noqa: F811
    """Ann reads #staff and #project, but Ben, who reads #general, reads neither."""
    harness = await server_with_photos(start_bot)
    assert readable_channel_ids(harness.guild, harness.member("ann")) == {
        harness.channel_ids[name] for name in ("general", "staff", "project")
    }

    sent = await mention(harness, "ann", "general")
    assert shown_channels(harness, sent) == {"general"}

    # A reply to the bot's answer is answered in the channel too, for the same audience.
    before = len(harness.world.sent)
    await harness.post("general", "ann", "and the others?", reply_to=sent[-1].message_id)
    replied = harness.sent_since(before)
    assert replied and replied[0].channel_id == harness.channel_ids["general"]
    assert shown_channels(harness, replied) == {"general"}

    assert shown_channels(harness, await slash_ask(harness, "ann", "general", private=False)) == {"general"}


async def test_private_answers_and_dms_keep_the_askers_full_scope(start_bot: StartBot) -> None:  # noqa: F811
    harness = await server_with_photos(start_bot)
    everything = {"general", "staff", "project"}
    assert shown_channels(harness, await slash_ask(harness, "ann", "general", private=True)) == everything
    assert shown_channels(harness, await dm(harness, "ann")) == everything


async def test_asking_in_staff_shows_the_channels_staff_can_all_read(start_bot: StartBot) -> None:  # noqa: F811
    """Everyone who reads #staff reads #general and #project too, so all three may be shown."""
    harness = await server_with_photos(start_bot)
    everything = {"general", "staff", "project"}
    assert shown_channels(harness, await mention(harness, "ann", "staff")) == everything
    assert shown_channels(harness, await slash_ask(harness, "ann", "staff", private=False)) == everything


async def test_a_member_overwrite_widens_the_audience(start_bot: StartBot) -> None:  # noqa: F811
    """Eve reads #project through her own overwrite, not through a role. An answer in #project is
    read by her, so it must not show #staff photos, even to a Staff asker; her member overwrite
    is checked against each channel, and #general, which she reads, still qualifies."""
    harness = await server_with_photos(start_bot)
    assert shown_channels(harness, await mention(harness, "ann", "project")) == {"general", "project"}
    assert f"get_member {harness.guild_id} {harness.user_ids['eve']}" in harness.world.calls

    # Eve herself: #project is hers to see, but not to show in #general.
    assert shown_channels(harness, await mention(harness, "eve", "general")) == {"general"}
    assert shown_channels(harness, await mention(harness, "eve", "project")) == {"general", "project"}
    assert shown_channels(harness, await slash_ask(harness, "eve", "general", private=True)) == {"general", "project"}
    assert shown_channels(harness, await dm(harness, "eve")) == {"general", "project"}


async def test_a_member_shut_out_of_a_channel_keeps_its_photos_out(start_bot: StartBot) -> None:  # noqa: F811
    """Dan has the Staff role but his own overwrite denies him #general: an answer in #staff, which
    he reads, must not show #general photos, although every role that reads #staff reads #general."""
    layout = Layout(
        roles={"staff": discord.Permissions.none()},
        channels=[
            ChannelSpec("general", {"dan": deny(view_channel=True)}),
            ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True)}),
        ],
        members={"ann": ["staff"], "dan": ["staff"], "root": []},
    )
    harness = await server_with_photos(start_bot, layout)
    assert shown_channels(harness, await mention(harness, "ann", "staff")) == {"staff"}
    assert shown_channels(harness, await slash_ask(harness, "ann", "staff", private=True)) == {"general", "staff"}

    # Once Dan has left the server, nobody reading #staff is shut out of #general.
    del harness.world.members[(harness.guild_id, harness.user_ids["dan"])]
    assert shown_channels(harness, await mention(harness, "ann", "staff")) == {"general", "staff"}


async def test_a_role_shut_out_of_a_channel_keeps_its_photos_out(start_bot: StartBot) -> None:  # noqa: F811
    """The Jailed role is denied #general. Joe is Staff and Jailed: he reads #staff but not
    #general, although Staff alone reads both and Jailed alone reads neither. Without the members
    intent nobody can tell whether a Staff member is also Jailed, so #general is held back from
    answers in #staff."""
    layout = Layout(
        roles={"staff": discord.Permissions.none(), "jailed": discord.Permissions.none()},
        channels=[
            ChannelSpec("general", {"jailed": deny(view_channel=True)}),
            ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True)}),
        ],
        members={"ann": ["staff"], "joe": ["staff", "jailed"], "root": []},
    )
    harness = await server_with_photos(start_bot, layout)
    permissions = harness.permissions("joe", "general")
    assert not permissions.view_channel and harness.permissions("joe", "staff").view_channel
    assert shown_channels(harness, await mention(harness, "ann", "staff")) == {"staff"}
    assert shown_channels(harness, await slash_ask(harness, "ann", "staff", private=True)) == {"general", "staff"}
    # In #general itself, whoever reads the answer reads #general.
    assert shown_channels(harness, await mention(harness, "ann", "general")) == {"general"}


async def test_members_that_cannot_be_looked_up_hold_channels_back(start_bot: StartBot) -> None:  # noqa: F811
    """Without the members intent Eve is not in the cache: unless she is passed in, nobody can say
    what she reads, so an answer in #project shows nothing, not even #project's own photos (for
    all anyone knows, she may view it without reading its history)."""
    harness = await start_bot(LAYOUT)
    ids = harness.channel_ids
    project = harness.channel("project")
    candidates = set(ids.values())
    assert audience_channel_ids(harness.guild, project, candidates) == set()
    eve = harness.member("eve")
    assert audience_channel_ids(harness.guild, project, candidates, members={eve.id: eve}) == {
        ids["general"], ids["project"]
    }
    # Known to have left the server: she reads nothing, and holds nothing back.
    assert audience_channel_ids(harness.guild, project, candidates, members={eve.id: None}) == candidates


async def test_threads_are_judged_by_their_parent(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    ids = harness.channel_ids
    guild = harness.guild
    threads = [
        KnownThread(901, ids["general"], guild.id),
        KnownThread(902, ids["staff"], guild.id),
        KnownThread(903, ids["general"], guild.id, private=True, owner_id=harness.user_ids["ann"]),
    ]
    candidates = set(ids.values()) | {901, 902, 903}
    general, staff = harness.channel("general"), harness.channel("staff")
    # In #general: the public thread of #general, not the #staff thread nor the private thread.
    assert audience_channel_ids(guild, general, candidates, threads) == {ids["general"], 901}
    # In #staff: everything but the private thread, which is only shown in itself.
    assert audience_channel_ids(guild, staff, candidates, threads) == candidates - {903}
    # In the #staff thread: judged as #staff; in the private thread: judged as #general, plus itself.
    assert audience_channel_ids(guild, discord.Object(902), candidates, threads) == candidates - {903}
    assert audience_channel_ids(guild, discord.Object(903), candidates, threads) == {ids["general"], 901, 903}



async def post_photos(harness: Harness, photos: dict[str, tuple[str, str]]) -> None:
    """Root posts one photo of each (colour, shape) in its channel; all of them indexed."""
    for channel, (colour, shape) in photos.items():
        await harness.post(channel, "root", f"a {colour} {shape}", files=[(f"{shape}.jpg", scene_jpeg(colour, shape))])
    await harness.drain()

async def test_viewers_without_history_are_in_the_audience(start_bot: StartBot) -> None:  # noqa: F811
    """Read Message History only governs scrolling back: whoever may view a channel sees every
    answer posted there while they look. In #lobby only Staff may scroll back, but Ben views it,
    so an answer there must not show #staff photos; in #club Eve's own overwrite lets her view
    without history, with the same consequence."""
    layout = Layout(
        roles={"staff": discord.Permissions.none()},
        channels=[
            ChannelSpec("lobby", {"@everyone": deny(read_message_history=True), "staff": allow(read_message_history=True)}),
            ChannelSpec("club", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True),
                                 "eve": (discord.Permissions(view_channel=True),
                                         discord.Permissions(read_message_history=True))}),
            ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True)}),
        ],
        members={"ann": ["staff"], "ben": [], "eve": [], "root": ["staff"]},
    )
    harness = await start_bot(layout)
    await post_photos(harness, {"lobby": ("red", "circle"), "club": ("green", "triangle"), "staff": ("blue", "star")})
    ben_lobby = harness.permissions("ben", "lobby")
    assert ben_lobby.view_channel and not ben_lobby.read_message_history
    eve_club = harness.permissions("eve", "club")
    assert eve_club.view_channel and not eve_club.read_message_history

    assert "staff" not in shown_channels(harness, await mention(harness, "ann", "lobby"))
    assert "staff" not in shown_channels(harness, await mention(harness, "ann", "club"))
    # In #staff itself, its own photos are shown.
    assert "staff" in shown_channels(harness, await mention(harness, "ann", "staff"))


async def test_an_answer_shows_its_own_channels_old_photos_only_if_every_viewer_may_scroll_back(
    start_bot: StartBot,  # noqa: F811
) -> None:
    """Ben may view #lobby but not read its history, so he cannot scroll back to its old photos
    in Discord: an answer in #lobby, or in a thread of it, must not show them to him. In #staff
    Dan's own overwrite takes the history away from him alone; once he has left the server,
    everyone viewing #staff reads it, and its photos are shown there again."""
    layout = Layout(
        roles={"staff": discord.Permissions.none()},
        channels=[
            ChannelSpec("lobby", {"@everyone": deny(read_message_history=True), "staff": allow(read_message_history=True)}),
            ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True),
                                  "dan": deny(read_message_history=True)}),
        ],
        members={"ann": ["staff"], "ben": [], "dan": ["staff"], "root": ["staff"]},
    )
    harness = await start_bot(layout)
    await harness.create_thread("lobby", "lobby-chat", owner="root")
    await post_photos(harness, {"lobby": ("red", "circle"), "lobby-chat": ("green", "triangle"), "staff": ("blue", "star")})
    ben = harness.permissions("ben", "lobby")
    assert ben.view_channel and not ben.read_message_history
    dan = harness.permissions("dan", "staff")
    assert dan.view_channel and not dan.read_message_history

    lobby = {"lobby", "lobby-chat"}
    assert not lobby & shown_channels(harness, await mention(harness, "ann", "lobby"))
    assert not lobby & shown_channels(harness, await mention(harness, "ann", "lobby-chat"))
    # Ann herself may scroll back: an answer only she sees shows them.
    assert lobby <= shown_channels(harness, await slash_ask(harness, "ann", "lobby", private=True))

    assert "staff" not in shown_channels(harness, await mention(harness, "ann", "staff"))
    del harness.world.members[(harness.guild_id, harness.user_ids["dan"])]
    assert "staff" in shown_channels(harness, await mention(harness, "ann", "staff"))
