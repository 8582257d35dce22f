"""Asking: mention the bot, DM it, reply to it, or use `/ask` — and get photos back.

Each question goes to the agent with the asker's scope, computed from Discord's permissions at that
moment (`bot/scope.py`): in a server, the channels of that server the asker can view and read the
history of; in a DM, the same across every server the asker shares with the bot. An answer posted
publicly in a server channel (a mention or reply there, or `/ask` without `private`) is read by the
whole channel, so its scope is further limited to the channels everyone there can read as well
(`audience_channel_ids`); DMs and private `/ask` answers keep the asker's full scope. A reply to one
of the bot's answers continues the conversation: the reply chain is walked back to rebuild the
earlier turns.

The answer comes back as text (split cleanly under Discord's limit) followed by the photos as
attachments from the library's stored copies, each with a card saying who posted it, where and
when, with a jump link. Whatever goes wrong, the asker gets one clear sentence, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import discord
from discord import app_commands
from discord.ext import commands

from bot.access import confirmed, readable_now
from bot.discord_app import addresses_bot, mentions_pattern, own_role_id
from bot.replies import DEFAULT_UPLOAD_LIMIT, OutgoingMessage, plan_reply
from bot.scope import (
    KnownThread,
    audience_channel_ids,
    nothing,
    overwrite_member_ids,
    private_thread_asked_in,
    readable_channel_ids,
)
from store.ingest import too_large_reason
from tools.search import Scope

if TYPE_CHECKING:
    from bot.discord_app import ShoeboxBot

log = logging.getLogger(__name__)

MAX_QUESTION_IMAGES = 4
MAX_HISTORY_TURNS = 6
MAX_OVERWRITE_LOOKUPS = 10  # members fetched per question to check their own channel overwrites
PHOTO_ONLY = "(sent a photo)"
HELP_TEXT = (
    "Ask me about photos posted here, for example: *the red car from the summer trip*, or attach a "
    "photo to find look-alikes. I only show photos from channels you can read."
)
FAILED_TEXT = "Sorry, something went wrong while I was looking. It has been logged for the server admin."
TIMEOUT_TEXT = "Sorry, that took too long. Please try again in a moment."

Sender = Callable[..., Awaitable[Any]]


@dataclass
class Answer:
    """What to post: the answer's text and the images it shows (bot.agent.ShownImage)."""

    text: str
    images: Sequence[Any] = field(default_factory=list)


def _agent_types() -> Any:
    import bot.agent as agent_module  # imported at use time: the agent is optional until asked

    return agent_module


class Ask(commands.Cog):
    """Questions in, answers with photos out."""

    def __init__(self, bot: "ShoeboxBot") -> None:
        self.bot = bot

    # ---- scope ------------------------------------------------------------------------------

    async def scope_for(
        self,
        user: discord.abc.User,
        guild: discord.Guild | None,
        answer_channel: discord.abc.Snowflake | None = None,
        asked_in: discord.abc.Snowflake | None = None,
    ) -> Scope:
        """What `user` may be shown right now, from Discord's permissions (never cached).

        `answer_channel` is the server channel the answer will be posted in for everyone there to
        read; None for a DM or an answer only the asker sees. When given, the asker's channels
        are narrowed to those at least as visible as it, so the answer shows nobody in that
        channel a photo they could not already read. `asked_in` is the channel the question came
        from: asked inside a private thread, that thread's photos are the asker's to see.
        """
        if guild is not None:
            member = user if isinstance(user, discord.Member) else await self._member(guild, user.id)
            if member is None:
                return nothing()
            known = await self.bot.jobs.known_threads(guild.id)
            inside = private_thread_asked_in(guild, member, asked_in or answer_channel)
            channel_ids = readable_channel_ids(guild, member, known) | inside
            if answer_channel is not None:
                wanted = overwrite_member_ids(guild, answer_channel, channel_ids, known)
                members = await self._overwrite_members(guild, wanted)
                members.setdefault(member.id, member)
                channel_ids = audience_channel_ids(guild, answer_channel, channel_ids, known, members)
            # Narrowed first: a public answer shows no private thread but its own, so none is asked about.
            channel_ids = await confirmed(self.bot.http, guild, member, channel_ids, known, inside)
            return Scope.channels(channel_ids, {guild.id})
        # A DM: the union over every server the user shares with the bot.
        threads: dict[int, list[KnownThread]] = {}
        for thread in await self.bot.jobs.known_threads():
            threads.setdefault(thread.guild_id, []).append(thread)
        channel_ids, guild_ids = set(), set()
        for shared in self.bot.guilds:
            member = await self._member(shared, user.id)
            if member is not None:
                channel_ids |= await readable_now(self.bot.http, shared, member, threads.get(shared.id, ()))
                guild_ids.add(shared.id)
        return Scope.channels(channel_ids, guild_ids)

    async def _overwrite_members(
        self, guild: discord.Guild, user_ids: Sequence[int]
    ) -> dict[int, discord.Member | None]:
        """Members with their own channel overwrites, looked up for the audience check.

        None means the user is no longer in the server (they read nothing there). Ids not looked
        up (past the limit, or after an API error) stay unknown, and the channels they concern are
        held back from public answers.
        """
        found: dict[int, discord.Member | None] = {}
        for user_id in list(user_ids)[:MAX_OVERWRITE_LOOKUPS]:
            member = guild.get_member(user_id)
            if member is None:
                try:
                    member = await guild.fetch_member(user_id)
                except discord.NotFound:
                    member = None
                except discord.HTTPException as error:
                    log.warning("Could not look up member %s in %s: %s", user_id, guild.id, error)
                    continue
            found[user_id] = member
        return found

    async def _member(self, guild: discord.Guild, user_id: int) -> discord.Member | None:
        """The member from the cache or, without the members intent, from the API."""
        member = guild.get_member(user_id)
        if member is not None:
            return member
        try:
            return await guild.fetch_member(user_id)
        except discord.NotFound:
            return None
        except discord.HTTPException as error:
            log.warning("Could not look up member %s in %s: %s", user_id, guild.id, error)
            return None

    # ---- the question -----------------------------------------------------------------------

    def question_text(self, message: discord.Message) -> str:
        me = self.bot.user
        text = message.content or ""
        if me is not None:
            text = mentions_pattern(me.id, own_role_id(message.guild)).sub(" ", text)
        return " ".join(text.split())

    async def read_images(self, attachments: Sequence[discord.Attachment]) -> tuple[list[Any], list[str]]:
        """The attached files as agent Attachments (the agent's decoder decides what is a photo),
        and a sentence for each file left out, so that nobody's photo is ignored without a word."""
        Attachment = _agent_types().Attachment
        limit = self.bot.settings.ingest.max_file_bytes
        out: list[Any] = []
        notes: list[str] = []
        attached = list(attachments)
        if len(attached) > MAX_QUESTION_IMAGES:
            notes.append(f"I looked at the first {MAX_QUESTION_IMAGES} of your {len(attached)} files only.")
        for attachment in attached[:MAX_QUESTION_IMAGES]:
            if attachment.size and attachment.size > limit:
                notes.append(f"I left out {attachment.filename}: {too_large_reason(attachment.size, limit)}.")
                continue
            try:
                out.append(Attachment(data=await attachment.read(), filename=attachment.filename))
            except discord.HTTPException as error:
                log.warning("Could not read attachment %s: %s", attachment.filename, error)
                notes.append(f"I could not download {attachment.filename}; please try again.")
        return out, notes

    async def _resolve(self, message: discord.Message) -> discord.Message | None:
        reference = message.reference
        if reference is None or reference.message_id is None:
            return None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        if reference.cached_message is not None:
            return reference.cached_message
        try:
            return await message.channel.fetch_message(reference.message_id)
        except discord.HTTPException:
            return None

    async def history_for(self, message: discord.Message) -> list[Any]:
        """Earlier turns of this conversation, oldest first, from the chain of replies.

        The bot answers every question as a reply to it, so the chain alternates: this message
        replies to an answer, which replies to the previous question, and so on.
        """
        Turn = _agent_types().Turn
        me = self.bot.user
        turns = []
        current = message
        while me is not None and len(turns) < MAX_HISTORY_TURNS:
            answer = await self._resolve(current)
            if answer is None or answer.author.id != me.id:
                break
            question = await self._resolve(answer)
            if question is None:
                break
            turns.append(Turn(question=self.question_text(question) or PHOTO_ONLY, answer=_answer_text(answer)))
            current = question
        turns.reverse()
        return turns

    async def ask_agent(
        self, question: str, scope: Scope, attachments: Sequence[Any] = (), history: Sequence[Any] = ()
    ) -> Answer:
        """The agent's reply as an Answer; failures become one clear sentence."""
        try:
            reply = await asyncio.wait_for(
                self.bot.agent.answer(question, scope, attachments=attachments, history=history),
                timeout=self.bot.config.answer_timeout,
            )
        except asyncio.TimeoutError:
            log.warning("Answer timed out after %.0fs", self.bot.config.answer_timeout)
            return Answer(TIMEOUT_TEXT)
        except Exception:
            log.exception("The agent failed on a question")
            return Answer(FAILED_TEXT)
        # The agent's text already explains offline mode and Claude failures in one sentence.
        text = (getattr(reply, "answer", "") or "").strip()
        images = list(getattr(reply, "images", []) or [])
        if not text and not images:
            error = getattr(reply, "error", None)
            text = f"Sorry, I couldn't answer that just now: {error}" if error else "I found no photos for that."
        return Answer(text, images)

    def plan(self, answer: Answer, guild: discord.Guild | None, *, cards: bool = True) -> list[OutgoingMessage]:
        limit = guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT
        return plan_reply(answer.text, answer.images, upload_limit=limit, cards=cards)

    # ---- sending ------------------------------------------------------------------------------

    async def deliver(self, send: Sender, parts: list[OutgoingMessage], **extra: Any) -> None:
        """Send each part; if files or embeds are refused (missing permissions), fall back to text."""
        for part in parts:
            kwargs: dict[str, Any] = dict(extra)
            if part.content:
                kwargs["content"] = part.content
            if part.files:
                kwargs["files"] = [f.to_discord() for f in part.files]
            if part.embeds:
                kwargs["embeds"] = part.embeds
            try:
                await send(**kwargs)
            except discord.Forbidden:
                fallback = _plain_text(part)
                if not fallback:
                    raise
                await send(content=fallback, **extra)

    # ---- entry points -----------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None or message.author.bot or not addresses_bot(message, me):
            return
        try:
            await self.answer_message(message)
        except discord.Forbidden as error:
            log.info("Cannot answer in channel %s: %s", message.channel.id, error)
        except Exception:
            log.exception("Answering message %s failed", message.id)
            try:
                await reply_to(message, content=FAILED_TEXT)
            except discord.HTTPException:
                pass

    async def answer_message(self, message: discord.Message) -> None:
        question = self.question_text(message)
        images, notes = await self.read_images(message.attachments)
        if not question and not images:
            await reply_to(message, content="\n".join(notes) if notes else HELP_TEXT)
            return
        async with message.channel.typing():
            # In a server the reply is public: everyone in the channel will read it.
            audience = message.channel if message.guild is not None else None
            scope = await self.scope_for(message.author, message.guild, audience)
            history = await self.history_for(message)
            answer = with_notes(await self.ask_agent(question, scope, images, history), notes)
        parts = self.plan(answer, message.guild, cards=may_embed(message.channel))

        async def send(**kwargs: Any) -> Any:
            return await reply_to(message, **kwargs)

        await self.deliver(send, parts)

    @app_commands.command(name="ask", description="Find photos posted here by what is in them")
    @app_commands.describe(
        question="What are you looking for? e.g. 'the beach at sunset last summer'",
        image="A photo to find look-alikes of",
        private="Only you see the answer, so it can show photos from channels others here can't read",
    )
    async def ask(
        self,
        interaction: discord.Interaction,
        question: app_commands.Range[str, 1, 500],
        image: discord.Attachment | None = None,
        private: bool = False,
    ) -> None:
        await interaction.response.defer(thinking=True, ephemeral=private)
        images, notes = await self.read_images([image] if image else [])
        asked_in = interaction.channel or discord.Object(interaction.channel_id or 0)
        audience = asked_in if interaction.guild is not None and not private else None
        scope = await self.scope_for(interaction.user, interaction.guild, audience, asked_in)
        answer = with_notes(await self.ask_agent(question, scope, images), notes)
        parts = self.plan(answer, interaction.guild)
        await self.deliver(interaction.followup.send, parts, ephemeral=private)


def may_embed(channel: Any) -> bool:
    """Whether the bot's cards would show in `channel`: without Embed Links, Discord drops the
    cards of a message that has text, without an error. Answers to `/ask` are the interaction's
    own messages, which show them anyway. Where the bot cannot even view the channel, nothing it
    sends arrives, so cards cost nothing there."""
    guild = getattr(channel, "guild", None)
    if guild is None or guild.me is None:
        return True
    permissions = channel.permissions_for(guild.me)
    return permissions.embed_links or not permissions.view_channel


async def reply_to(message: discord.Message, **kwargs: Any) -> discord.Message:
    """Send a reply to `message` without pinging its author.

    An answer can take a minute, and the question may be deleted meanwhile; Discord then refuses
    a plain reply, so the answer goes to the channel as a plain message instead of being lost.
    """
    reference = message.to_reference(fail_if_not_exists=False)
    return await message.channel.send(reference=reference, mention_author=False, **kwargs)


def with_notes(answer: Answer, notes: Sequence[str]) -> Answer:
    """The answer, after a word on each attached file that was left out."""
    if not notes:
        return answer
    return Answer("\n".join([*notes, answer.text]), answer.images)


def _answer_text(message: discord.Message) -> str:
    """An earlier answer as the agent should remember it: its text and which photos it showed."""
    lines = [message.content] if message.content else []
    for embed in message.embeds:
        footer = embed.footer.text if embed.footer else None
        if footer:
            lines.append(f"[showed {footer.split(' · ')[0]}: {embed.title or 'a photo'}]")
    return "\n".join(lines)


def _plain_text(part: OutgoingMessage) -> str:
    """A part without files or embeds: the text plus a jump link per photo."""
    lines = [part.content] if part.content else []
    for embed in part.embeds:
        if embed.url:
            lines.append(f"{embed.title or 'Photo'}: {embed.url}")
    return "\n".join(lines)[:2000]


async def setup(bot: "ShoeboxBot") -> None:
    await bot.add_cog(Ask(bot))
