"""Asking the bot: mention, reply chain, DM and /ask, against a scripted Claude over real HTTP.

"Claude" is the scripted Messages API server in tests/fake_anthropic.py; the agent, the library,
the scope and the Discord layer are all real. These tests pin down what the bot sends to Claude
(the question without the mention, the asker's scope, the conversation so far) and what it posts
back (text split cleanly, photos from the stored copies with their cards, one clear sentence when
something fails).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator, Callable

import discord
import pytest

from bot.agent import Agent
from bot.cogs.ask import FAILED_TEXT, HELP_TEXT, TIMEOUT_TEXT
from bot.replies import MESSAGE_LIMIT
from store.library import Library
from tests.discord_harness import (
    ChannelSpec,
    Harness,
    Layout,
    StartBot,
    allow,
    deny,
    scene_jpeg,
    snowflake,
    start_bot,  # noqa: F401 - fixture
)
from tests.fake_anthropic import (
    FakeAnthropic,
    Status,
    agents_against,
    answer,
    fake_anthropic,  # noqa: F401 - fixture
    message,
    text,
    tool_results,
    tool_use,
)

THREAD_STARTER_MESSAGE = 21  # Discord's type for a thread's first message, pointing at its source

LAYOUT = Layout(
    roles={"staff": discord.Permissions.none()},
    channels=[
        ChannelSpec("general"),
        ChannelSpec("staff", {"@everyone": deny(view_channel=True), "staff": allow(view_channel=True)}),
    ],
    members={"ann": ["staff"], "ben": []},
)


@pytest.fixture
async def claude(library: Library, fake_anthropic: FakeAnthropic) -> AsyncIterator[Callable[..., Agent]]:  # noqa: F811
    async with agents_against(library, fake_anthropic, retries=1, max_wait=1.0) as make:
        yield make


async def photos(harness: Harness) -> dict[str, int]:
    """One red circle in #general and one in #staff; returns channel -> image id."""
    ids = {}
    for channel, seed in (("general", 1), ("staff", 2)):
        posted = await harness.post(channel, "ann", f"red circle in {channel}",
                                    files=[(f"{channel}.jpg", scene_jpeg("red", "circle", seed=seed))])
        await harness.drain()
        (source,) = await harness.bot.library.catalog.sources_for_messages([posted.id])
        ids[channel] = int(source.image_id or 0)
    return ids


def card_footers(sent: list[Any]) -> list[str]:
    return [embed["footer"]["text"] for s in sent for embed in s.embeds]


async def test_a_mention_goes_to_claude_with_the_askers_scope(
    start_bot: StartBot, claude: Callable[..., Agent], fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT, agent=claude())
    ids = await photos(harness)
    # Claude searches, then (as if persuaded by something it read) cites both photos.
    fake_anthropic.script([
        message(tool_use("search_images", {"query": "red circle"})),
        answer(f"Here is the red circle [#{ids['general']}] and another [#{ids['staff']}]."),
    ])
    question = await harness.post("general", "ben", "where is the red circle?", mention_bot=True)
    first = fake_anthropic.bodies[0]["messages"][-1]
    assert first["role"] == "user" and first["content"] == "where is the red circle?"  # mention stripped
    results = json.dumps(tool_results(fake_anthropic.bodies[1]))
    assert str(harness.channel_ids["general"]) in results
    assert str(harness.channel_ids["staff"]) not in results  # Ben cannot read #staff
    sent = harness.world.sent
    assert len(sent) == 1
    reply = sent[0]
    assert reply.reference == question.id and reply.channel_id == harness.channel_ids["general"]
    assert f"[#{ids['general']}]" in (reply.content or "")
    (footer,) = card_footers(sent)  # the #staff citation was dropped: never shown to Ben
    assert footer.startswith(f"Image #{ids['general']}")
    assert [name for name, _ in reply.files] == [f"shoebox-{ids['general']}.jpg"]
    assert reply.files[0][1] == harness.bot.library.thumb_path(
        await harness.bot.library.catalog.get_image(ids["general"])  # type: ignore[arg-type]
    ).read_bytes()
    assert harness.world.typing == [harness.channel_ids["general"]]


async def test_replying_to_an_answer_continues_the_conversation(
    start_bot: StartBot, claude: Callable[..., Agent], fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT, agent=claude())
    ids = await photos(harness)
    fake_anthropic.script([
        message(tool_use("search_images", {"query": "red"})),
        answer(f"The red one is [#{ids['general']}]."),
    ])
    await harness.post("general", "ann", "show me red things", mention_bot=True)
    first_answer = harness.world.sent[-1]
    assert first_answer.message_id is not None
    fake_anthropic.script([answer("It was posted by Ann.")])
    # No mention this time: a reply to the bot's message is enough.
    await harness.post("general", "ann", "who posted it?", reply_to=first_answer.message_id)
    history = fake_anthropic.bodies[0]["messages"]  # the first request of the second question
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[0]["content"] == "show me red things"
    assert f"[#{ids['general']}]" in history[1]["content"]
    assert f"showed Image #{ids['general']}" in history[1]["content"]  # which photo was on screen
    assert history[2]["content"] == "who posted it?"
    assert harness.world.sent[-1].content == "It was posted by Ann."

    # After a restart the cache is empty, and Discord gives a reply only the message it answers:
    # the rest of the chain is fetched.
    harness.bot._connection._messages.clear()  # type: ignore[union-attr]
    calls = len(harness.world.calls)
    fake_anthropic.script([answer("On 14 July.")])
    await harness.post("general", "ann", "when?", reply_to=harness.world.sent[-1].message_id)
    history = fake_anthropic.bodies[0]["messages"]
    assert [m["content"] for m in history[::2]] == ["show me red things", "who posted it?", "when?"]
    assert history[3]["content"] == "It was posted by Ann."
    assert sum(c.startswith("get_message") for c in harness.world.calls[calls:]) == 2


async def test_mentioning_the_bots_own_role_asks_the_bot(
    start_bot: StartBot, claude: Callable[..., Agent], fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    """Discord offers the bot and the role it made for it side by side, both named Shoebox."""
    harness = await start_bot(LAYOUT, agent=claude())
    fake_anthropic.script([answer("Nothing like that here.")])
    await harness.post("general", "ann", f"<@&{harness.role_ids['Shoebox']}> any giraffes?")
    assert fake_anthropic.bodies[0]["messages"][-1]["content"] == "any giraffes?"
    assert [sent.content for sent in harness.world.sent] == ["Nothing like that here."]
    # Another role's mention is not a question to the bot.
    await harness.post("general", "ann", f"<@&{harness.role_ids['staff']}> lunch?")
    assert len(harness.world.sent) == 1


async def test_a_thread_started_from_an_answer_is_not_a_question(
    start_bot: StartBot, claude: Callable[..., Agent], fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    """Discord marks the start of such a thread with a system message that points at the answer,
    in the name of whoever started it; Discord refuses replies to it."""
    harness = await start_bot(LAYOUT, agent=claude())
    fake_anthropic.script([answer("Nothing like that here.")])
    await harness.post("general", "ann", "any giraffes?", mention_bot=True)
    (first_answer,) = harness.world.sent
    await harness.post("general", "ann", "", reply_to=first_answer.message_id, kind=THREAD_STARTER_MESSAGE)
    assert harness.world.sent == [first_answer] and fake_anthropic.remaining == 0


async def test_an_answer_to_a_question_deleted_meanwhile_is_still_delivered(
    start_bot: StartBot, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT)
    ids = await photos(harness)
    ask = harness.bot.get_cog("Ask")
    thinking = ask.ask_agent  # type: ignore[union-attr]

    async def deleted_while_thinking(*args: Any, **kwargs: Any) -> Any:
        question = harness.bot.cached_messages[-1]
        assert question.content.endswith("a red circle")
        await harness.delete_message(question)
        return await thinking(*args, **kwargs)

    monkeypatch.setattr(ask, "ask_agent", deleted_while_thinking)
    await harness.post("general", "ann", "a red circle", mention_bot=True)
    (sent,) = harness.world.sent
    assert sent.reference is None and sent.channel_id == harness.channel_ids["general"]
    assert f"shoebox-{ids['general']}.jpg" in [name for name, _ in sent.files]


async def test_a_long_answer_is_split_cleanly_with_photos_last(
    start_bot: StartBot, claude: Callable[..., Agent], fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT, agent=claude())
    ids = await photos(harness)
    paragraphs = [f"Paragraph {n}: " + "the photo shows a red circle on a plain background. " * 12 for n in range(8)]
    long_text = "\n\n".join(p.strip() for p in paragraphs) + f" [#{ids['general']}]"
    fake_anthropic.script([message(tool_use("search_images", {"query": "red circle"})), message(text(long_text))])
    question = await harness.post("general", "ann", "describe everything", mention_bot=True)
    sent = harness.world.sent
    assert len(sent) >= 3
    assert all(s.content and len(s.content) <= MESSAGE_LIMIT for s in sent)
    assert all(s.reference == question.id for s in sent)  # every part answers the question
    assert all(s.content.startswith("Paragraph ") for s in sent)  # type: ignore[union-attr]
    assert [len(s.files) for s in sent][-1] == 1 and not any(s.files for s in sent[:-1])
    assert " ".join(" ".join(s.content or "" for s in sent).split()) == " ".join(long_text.split())


async def test_offline_mode_answers_with_direct_matches(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)  # no API key: the offline agent
    ids = await photos(harness)
    await harness.post("staff", "ann", "red circle", mention_bot=True)  # all who read #staff read #general
    (reply,) = harness.world.sent
    assert "ANTHROPIC_API_KEY" in (reply.content or "")
    assert {f"shoebox-{i}.jpg" for i in ids.values()} == {name for name, _ in reply.files}


async def test_claude_failing_gives_one_clear_sentence(
    start_bot: StartBot, claude: Callable[..., Agent], fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    harness = await start_bot(LAYOUT, agent=claude())
    await photos(harness)
    fake_anthropic.script([Status(401, error_type="authentication_error", message="invalid x-api-key")])
    await harness.post("general", "ben", "red circle", mention_bot=True)
    (reply,) = harness.world.sent
    content = reply.content or ""
    assert "ANTHROPIC_API_KEY" in content
    assert "Traceback" not in content and "Error(" not in content
    assert len(reply.files) == 1  # the closest direct match Ben may see, instead


class Exploding:
    async def answer(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom: internal detail")


async def test_a_crashing_agent_never_reaches_the_user_and_the_bot_carries_on(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT, agent=Exploding())
    await harness.post("general", "ben", "red circle", mention_bot=True)
    (reply,) = harness.world.sent
    assert reply.content == FAILED_TEXT
    sent = await harness.slash("ben", "general", "ask", [{"name": "question", "type": 3, "value": "red"}])
    assert [s.content for s in sent if s.kind == "followup"] == [FAILED_TEXT]
    # Still indexing after both failures.
    posted = await harness.post("general", "ann", files=[("x.jpg", scene_jpeg("blue", "star"))])
    await harness.drain()
    assert await harness.bot.library.catalog.sources_for_messages([posted.id])


async def test_a_server_message_without_its_server_is_not_taken_for_a_dm(start_bot: StartBot) -> None:  # noqa: F811
    """discord.py gives a message no guild when its server is not in the cache; only a real DM
    channel makes it a DM, whose scope spans every server the asker shares with the bot."""
    harness = await start_bot(LAYOUT)
    unknown_server = snowflake()  # not in the bot's cache: discord.py gives the message no guild
    data = harness.http.world_message(harness.channel_ids["general"], harness.world.users[harness.user_ids["ann"]],
                                      f"<@{harness.world.bot_user['id']}> the secret plans", guild_id=unknown_server,
                                      mentions=[harness.world.bot_user])
    before = len(harness.world.sent)
    harness.bot._connection.parse_message_create(data)
    await harness.settle()
    message = harness.bot._connection._get_message(int(data["id"]))
    assert message is not None and message.guild is None
    assert harness.sent_since(before) == []
    await harness.post("", "ann", "a red circle", dm=True)  # a real DM is still answered
    assert harness.sent_since(before)


async def test_an_empty_mention_gets_a_hint(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await harness.post("general", "ben", "", mention_bot=True)
    assert [s.content for s in harness.world.sent] == [HELP_TEXT]


async def test_a_photo_left_out_is_never_left_out_silently(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    await photos(harness)
    too_big = harness.bot.settings.ingest.max_file_bytes + 1
    await harness.post("", "ann", "", files=[("holiday.jpg", scene_jpeg("red", "circle"))], dm=True,
                       declared_sizes=[too_big])
    (reply,) = harness.world.sent
    assert reply.content is not None and reply.content.startswith("I left out holiday.jpg: file is ")
    assert "limit" in reply.content and HELP_TEXT not in reply.content

    attachment = harness.upload("big.jpg", scene_jpeg("red", "circle"), size=too_big)
    sent = await harness.slash("ben", "general", "ask", [
        {"name": "question", "type": 3, "value": "the red circle"},
        {"name": "image", "type": 11, "value": attachment["id"]},
    ], resolved={"attachments": {attachment["id"]: attachment}})
    assert (sent[-1].content or "").startswith("I left out big.jpg: file is ")
    assert card_footers(sent)  # the question is still answered


async def test_look_alikes_of_an_attached_photo_with_ask(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    ids = await photos(harness)
    target = scene_jpeg("red", "circle", seed=1)  # the very photo posted in #general
    attachment = harness.upload("mine.jpg", target)
    sent = await harness.slash("ben", "general", "ask", [
        {"name": "question", "type": 3, "value": "more like this"},
        {"name": "image", "type": 11, "value": attachment["id"]},
    ], resolved={"attachments": {attachment["id"]: attachment}})
    footers = card_footers(sent)
    assert footers and footers[0].startswith(f"Image #{ids['general']}")
    assert all(not f.startswith(f"Image #{ids['staff']}") for f in footers)  # Ben can't see #staff
    assert not any(s.ephemeral for s in sent)


async def test_a_dm_question_with_a_photo_finds_look_alikes(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT)
    ids = await photos(harness)
    await harness.post("", "ann", "", files=[("q.jpg", scene_jpeg("red", "circle", seed=2))], dm=True)
    (reply,) = harness.world.sent
    assert reply.embeds and reply.embeds[0]["footer"]["text"].startswith(f"Image #{ids['staff']}")
    assert (await harness.bot.library.stats())["sources"] == 2  # a DM photo is a question, not a memory


async def test_where_the_bot_may_not_attach_files_it_answers_in_text_with_jump_links(start_bot: StartBot) -> None:  # noqa: F811
    layout = Layout(channels=[ChannelSpec("general"), ChannelSpec("no-files", {"Shoebox": deny(attach_files=True)})],
                    members={"ann": []})
    harness = await start_bot(layout)
    posted = await harness.post("general", "ann", "red circle", files=[("c.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    await harness.post("no-files", "ann", "red circle", mention_bot=True)
    (reply,) = harness.world.sent
    assert reply.files == [] and reply.embeds == []
    assert f"https://discord.com/channels/{harness.guild_id}/{harness.channel_ids['general']}/{posted.id}" in (reply.content or "")


async def test_where_the_bot_may_not_embed_links_each_photo_gets_a_line_beside_its_picture(start_bot: StartBot) -> None:  # noqa: F811
    """Discord would drop the cards without an error, leaving photos nobody can trace."""
    layout = Layout(channels=[ChannelSpec("general"), ChannelSpec("no-cards", {"Shoebox": deny(embed_links=True)})],
                    members={"ann": []})
    harness = await start_bot(layout)
    posted = await harness.post("general", "ann", "red circle", files=[("c.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    (source,) = await harness.bot.library.catalog.sources_for_messages([posted.id])
    await harness.post("no-cards", "ann", "red circle", mention_bot=True)
    (reply,) = harness.world.sent
    assert reply.embeds == [] and [name for name, _ in reply.files] == [f"shoebox-{source.image_id}.jpg"]
    link = f"https://discord.com/channels/{harness.guild_id}/{harness.channel_ids['general']}/{posted.id}"
    assert f"Image #{source.image_id} \u00b7 #general \u00b7 posted by Ann \u00b7 {link}" in (reply.content or "")


class Slow:
    async def answer(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)


async def test_an_answer_that_takes_too_long_gets_a_sentence_not_silence(start_bot: StartBot) -> None:  # noqa: F811
    harness = await start_bot(LAYOUT, agent=Slow())
    harness.bot.config = dataclasses.replace(harness.bot.config, answer_timeout=0.2)
    await harness.post("general", "ben", "red circle", mention_bot=True)
    (reply,) = harness.world.sent
    assert reply.content == TIMEOUT_TEXT
