"""Indexing: every photo posted where the bot can read goes into the library, and leaves it again.

A new attachment becomes a persisted job at once (nothing is downloaded in the event handler);
the queue worker downloads, decodes and embeds it off the event loop and reacts with a small emoji
when it is in. Whether a file is a photo is decided from its bytes by the library's decoder, not
from its name or the content type Discord reports.

Deleting a message (one or in bulk), editing attachments away, deleting a channel or thread, or
removing the bot from a server takes the photos out of the library — including jobs still waiting
and batches in flight.

Backfill walks a channel's history newest to oldest through `channel.history` (discord.py pages
and rate-limits the requests), queueing photos as it goes and saving how far it got after every
page, so an interrupted backfill resumes where it stopped. The walk also forgets the photos of
indexed messages it should have met and did not: deleted while no delete event could arrive.

Catching up covers the other gap: photos posted while the bot was stopped or disconnected. The
newest message seen in each channel is kept; on connecting, each channel with newer messages is
read forward from there, and a channel created since the bot last saw its server is read whole.
Threads that archived meanwhile are not in the cache; a new session lists them (public ones, and
the private ones the bot is in or, with Manage Threads, all of them).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
from collections.abc import Sequence, Set
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Iterable

import discord
from discord.ext import commands

from bot.discord_app import addresses_bot
from bot.jobs import BackfillState, DownloadGone, IndexJob, IndexQueue, SeenMark
from bot.scope import KnownThread, can_read_history
from bot.tasks import cancel_and_wait
from store.db import to_iso
from store.library import IndexOutcome

if TYPE_CHECKING:
    from bot.discord_app import ShoeboxBot

log = logging.getLogger(__name__)

BACKFILL_PAGE = 100  # messages per saved step; also discord.py's page size for history
RECENT_MARGIN = timedelta(minutes=1)  # newer messages are left to live events, whatever the clocks say
Progress = Callable[[BackfillState], Awaitable[None]]
Messageable = discord.TextChannel | discord.VoiceChannel | discord.StageChannel | discord.Thread
MESSAGEABLE = (discord.TextChannel, discord.VoiceChannel, discord.StageChannel, discord.Thread)


class BackfillBusy(RuntimeError):
    """A backfill of this channel is already running."""


_MENTION = re.compile(r"<(@[!&]?|#)([0-9]{15,20})>")


def posted_words(message: discord.Message) -> str:
    """The message's words as people read them (members and roles by name, as discord.py's
    `clean_content` gives them), except that a mentioned channel stays a bare "#channel": its
    name may be hidden from some who can see the photo (Discord shows them no name either)."""
    guild = message.guild

    def named(mention: re.Match[str]) -> str:
        kind, ident = mention[1], int(mention[2])
        if kind == "#":
            return "#channel"
        if kind == "@&":
            role = guild.get_role(ident) if guild else None
            return f"@{role.name}" if role else "@deleted-role"
        member = (guild.get_member(ident) if guild else None) or discord.utils.get(message.mentions, id=ident)
        return f"@{member.display_name}" if member else "@deleted-user"

    return discord.utils.escape_mentions(_MENTION.sub(named, message.content or ""))


def jobs_for(message: discord.Message, react: bool) -> list[IndexJob]:
    """One job per attachment, carrying who posted it, where, when, and the message's words."""
    guild = message.guild
    if guild is None:
        return []
    channel = message.channel
    text = posted_words(message)
    return [
        IndexJob(
            attachment_id=attachment.id,
            guild_id=guild.id,
            channel_id=channel.id,
            message_id=message.id,
            filename=attachment.filename,
            url=attachment.url,
            posted_at=to_iso(message.created_at),
            author_id=message.author.id,
            author_name=message.author.display_name,
            channel_name=getattr(channel, "name", None),
            posted_text=text,
            size=attachment.size or 0,
            react=react,
        )
        for attachment in message.attachments
    ]


def unseen_between(indexed: Sequence[int], lower: int, upper: int, seen: Set[int]) -> list[int]:
    """The ids in sorted `indexed` from `lower` up to (not including) `upper` that are not in
    `seen`: messages a walk through that stretch of history should have met, and did not."""
    start, end = bisect.bisect_left(indexed, lower), bisect.bisect_left(indexed, upper)
    return [message_id for message_id in indexed[start:end] if message_id not in seen]


def before_first(channel_id: int) -> int:
    """The id to read a channel's history *after* so that its first message is included.

    Discord reads history strictly after an id, and a forum or media post's opening message,
    which usually holds its photos, has the thread's own id; every other first message is newer.
    """
    return channel_id - 1


def rule_allows(rules: dict[int, str], ids: Iterable[int]) -> bool:
    """Per-guild rules: an excluded channel (or its category or parent) is never indexed; when any
    channel is explicitly included, only included ones (or their threads and children) are."""
    candidates = [i for i in ids if i]
    if any(rules.get(i) == "exclude" for i in candidates):
        return False
    if any(mode == "include" for mode in rules.values()):
        return any(rules.get(i) == "include" for i in candidates)
    return True


def messageable_channels(guild: discord.Guild) -> list[Messageable]:
    """The server's channels and the threads in the cache: every place a photo can be posted."""
    return [*guild.text_channels, *guild.voice_channels, *guild.stage_channels, *guild.threads]


def thread_parents(guild: discord.Guild, me: discord.Member) -> list[discord.TextChannel | discord.ForumChannel]:
    """The channels whose archived threads the bot may list: text and forum channels it can read."""
    parents: list[discord.TextChannel | discord.ForumChannel] = [*guild.text_channels, *guild.forums]
    return [parent for parent in parents if can_read_history(parent, me)]


def archived_listings(
    parent: discord.TextChannel | discord.ForumChannel, me: discord.Member
) -> list[tuple[AsyncIterator[discord.Thread], bool]]:
    """The listings of `parent`'s archived threads that the bot may ask Discord for, each with
    whether it comes most recently archived first.

    Public threads always. Private ones only exist in text channels: all of them with Manage
    Threads, or else those the bot is in, the only ones it could read; that listing comes by
    decreasing id, not archive time.
    """
    listings = [(parent.archived_threads(limit=None), True)]
    if isinstance(parent, discord.TextChannel):
        if parent.permissions_for(me).manage_threads:
            listings.append((parent.archived_threads(private=True, limit=None), True))
        else:
            listings.append((parent.archived_threads(private=True, joined=True, limit=None), False))
    return listings


def rule_ids(channel: discord.abc.GuildChannel | discord.Thread) -> list[int]:
    """The channel, its parent (for a thread) and their categories: the ids a rule may name."""
    ids = [channel.id]
    if isinstance(channel, discord.Thread):
        ids.append(channel.parent_id)
        parent = channel.parent
        if parent is not None and parent.category_id:
            ids.append(parent.category_id)
    elif getattr(channel, "category_id", None):
        ids.append(channel.category_id)  # type: ignore[arg-type]
    return ids


class Indexing(commands.Cog):
    """Keeps the library in step with what is posted, edited and deleted."""

    def __init__(self, bot: "ShoeboxBot") -> None:
        self.bot = bot
        self.queue = IndexQueue(
            bot.jobs, bot.library, self.download, bot.config.queue, on_indexed=self.acknowledge,
            on_new_images=lambda count: bot.dispatch("new_images", count), accepts=self.still_wanted,
        )
        self._rules: dict[int, dict[int, str]] = {}
        # Channel or thread id -> the one a backfill is reading: an archived thread is not in the
        # cache, and `still_wanted` needs it to see the rules of its parent.
        self._backfilling: dict[int, Messageable] = {}
        self._marks: dict[int, SeenMark] = {}  # channel -> the newest message kept as seen
        # Server -> the newest message seen there before this connection: a channel created
        # after it was created while the bot was away (see `_catch_up_unmarked`).
        self._present_until: dict[int, int] = {}
        self._holding_first_marks = False  # from connecting until a catch-up pass has run
        self._connections = 0  # connections begun, so a pass clears only its own connection's hold
        self._list_archived = False  # a new session: threads may have archived unseen (see catch_up)
        self._holds: dict[int, int] = {}  # channel -> how many reasons hold its mark back
        self._held: dict[int, int] = {}  # channel -> the newest message seen while held
        self._awaiting_catch_up: set[int] = set()
        self._catching_up: asyncio.Task[tuple[int, int]] | None = None
        self._catch_up_again = False

    async def cog_load(self) -> None:
        self._rules = await self.bot.jobs.rules()
        self._marks = {mark.channel_id: mark for mark in await self.bot.jobs.seen_marks()}
        self._hold_for_catching_up()  # until connected and caught up
        pending = await self.queue.pending()
        if pending:
            log.info("Resuming %d queued photo(s) from before the restart", pending)
        self.queue.start()

    async def cog_unload(self) -> None:
        await cancel_and_wait(self._catching_up)
        await self.queue.stop()

    # ---- rules ----------------------------------------------------------------------------

    def wants(self, channel: discord.abc.GuildChannel | discord.Thread) -> bool:
        rules = self._rules.get(channel.guild.id)
        return True if not rules else rule_allows(rules, rule_ids(channel))

    def still_wanted(self, job: IndexJob) -> bool:
        """Whether a job may still be queued: the bot is in its server, and its channel (where
        the cache or a running backfill knows it) is not ruled out."""
        guild = self.bot.get_guild(job.guild_id)
        if guild is None:
            return False
        channel = guild.get_channel_or_thread(job.channel_id) or self._backfilling.get(job.channel_id)
        return channel is None or self.wants(channel)

    def rules_of(self, guild_id: int) -> dict[int, str]:
        return dict(self._rules.get(guild_id, {}))

    async def set_rule(self, guild_id: int, channel_id: int, mode: str | None) -> None:
        await self.bot.jobs.set_rule(guild_id, channel_id, mode)
        self._rules = await self.bot.jobs.rules()

    async def clear_rules(self, guild_id: int) -> None:
        for channel_id in list(self._rules.get(guild_id, {})):
            await self.bot.jobs.set_rule(guild_id, channel_id, None)
        self._rules = await self.bot.jobs.rules()

    # ---- new photos -----------------------------------------------------------------------

    def indexable(self, message: discord.Message) -> bool:
        """Photos in server channels, not the bot's own posts, and not questions to the bot
        (a photo sent to ask for look-alikes is a query, not something to remember)."""
        me = self.bot.user
        if message.guild is None or not message.attachments or me is None:
            return False
        if message.author.id == me.id:
            return False
        if addresses_bot(message, me):
            return False
        return self.wants(message.channel)  # type: ignore[arg-type]

    async def remember_thread(self, channel: object) -> None:
        if isinstance(channel, discord.Thread):
            await self.bot.jobs.remember_thread(
                KnownThread(channel.id, channel.parent_id, channel.guild.id, channel.is_private(), channel.owner_id)
            )

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if self.indexable(message):
            # Until its photos are queued, no later post may move the channel's mark past it.
            self._hold(message.channel.id)
            try:
                await self.remember_thread(message.channel)
                await self.queue.submit(jobs_for(message, react=self.bot.config.reaction is not None))
            finally:
                await self._release(message.channel.id, message.guild.id)  # type: ignore[union-attr]
        await self.note_seen(message)

    async def acknowledge(self, job: IndexJob, outcome: IndexOutcome) -> None:
        """React to an indexed photo's message; silently skip when reactions are not allowed."""
        emoji = self.bot.config.reaction
        if not emoji:
            return
        channel = self.bot.get_channel(job.channel_id) or self.bot.get_partial_messageable(
            job.channel_id, guild_id=job.guild_id
        )
        try:
            await channel.get_partial_message(job.message_id).add_reaction(emoji)  # type: ignore[union-attr]
        except discord.HTTPException as error:
            log.debug("No reaction on message %s: %s", job.message_id, error)

    async def download(self, job: IndexJob) -> bytes:
        """The attachment's bytes. Discord's CDN links expire, so a refused link is refreshed by
        fetching the message again; a message that is gone ends the job instead of retrying."""
        try:
            return await self.bot.http.get_from_cdn(job.url)
        except (discord.NotFound, discord.Forbidden) as error:
            log.debug("CDN refused %s (%s); fetching the message again", job.filename, error.status)
        try:
            channel = self.bot.get_channel(job.channel_id) or await self.bot.fetch_channel(job.channel_id)
            message = await channel.fetch_message(job.message_id)  # type: ignore[union-attr]
        except (discord.NotFound, discord.Forbidden) as error:
            raise DownloadGone(f"message {job.message_id} is gone or unreadable") from error
        for attachment in message.attachments:
            if attachment.id == job.attachment_id:
                return await attachment.read()
        raise DownloadGone(f"attachment {job.attachment_id} was removed from its message")

    # ---- photos leaving ---------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            await self.queue.forget_messages([payload.message_id])

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            await self.queue.forget_messages(payload.message_ids)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.guild_id is None:
            return
        if "content" in payload.data:
            # Words edited out must stop finding (and being shown with) the photos.
            changed = await self.queue.update_text(payload.message_id, posted_words(payload.message))
            if changed:
                log.info("Edit of message %s changed the words of %d photo(s)", payload.message_id, changed)
        attachments = payload.data.get("attachments")
        if attachments is None:
            return  # an edit event without the attachments field changed no attachment
        keep = {int(a["id"]) for a in attachments}
        gone = await self.queue.forget_attachments(payload.message_id, keep)
        if gone:
            log.info("Edit of message %s removed %d photo(s)", payload.message_id, len(gone))

    @commands.Cog.listener()
    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        await self.queue.forget_channel(channel.id)
        self._forget_marks([channel.id])
        self._rules = await self.bot.jobs.rules()

    @commands.Cog.listener()
    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        await self.queue.forget_channel(payload.thread_id)
        self._forget_marks([payload.thread_id])

    @commands.Cog.listener()
    async def on_guild_remove(self, guild: discord.Guild) -> None:
        gone = await self.queue.forget_guild(guild.id)
        self._rules.pop(guild.id, None)
        # Joining again starts afresh, like a first join.
        self._present_until.pop(guild.id, None)
        self._forget_marks([mark.channel_id for mark in self._marks.values() if mark.guild_id == guild.id])
        log.info("Removed from %s: forgot %d photo(s)", guild.name, len(gone))

    # ---- what was posted while the bot was away -----------------------------------------------
    #
    # Each channel's newest message seen is kept (`seen` in bot.sqlite3); catching up reads
    # forward from it. The kept mark must never pass a message that is not yet safely queued, so
    # it is held back while there is a reason: a connection began and the channel has not been
    # caught up since (messages arrive before `on_ready`, and a gap lies behind them), or a live
    # post's photos are still on their way into the queue (a later post must not pass it). The
    # newest message seen meanwhile is written when the last reason goes.

    def _hold(self, channel_id: int) -> None:
        self._holds[channel_id] = self._holds.get(channel_id, 0) + 1

    async def _release(self, channel_id: int, guild_id: int) -> None:
        self._holds[channel_id] -= 1
        if self._holds[channel_id] == 0:
            del self._holds[channel_id]
            newest = self._held.pop(channel_id, None)
            if newest is not None:
                await self._store_mark(channel_id, guild_id, newest)

    async def _write_mark(self, channel_id: int, guild_id: int, message_id: int) -> None:
        if self._holding_first_marks and channel_id not in self._marks:
            self._hold_until_caught_up(channel_id)  # it may be new: nothing it held may be skipped
        if channel_id in self._holds:
            self._held[channel_id] = max(self._held.get(channel_id, 0), message_id)
        else:
            await self._store_mark(channel_id, guild_id, message_id)

    async def _store_mark(self, channel_id: int, guild_id: int, message_id: int) -> None:
        """Move the kept mark forward (never back), whatever holds it: for live posts once no
        reason holds it, for a catch-up as it reads."""
        kept = self._marks.get(channel_id)
        if kept is None or message_id > kept.newest_id:
            self._marks[channel_id] = SeenMark(channel_id, guild_id, message_id)
            await self.bot.jobs.note_seen(channel_id, guild_id, message_id)

    def _forget_marks(self, channel_ids: Iterable[int]) -> None:
        """Drop the kept marks of channels whose rows `forget_channel` / `forget_guild` removed."""
        for channel_id in channel_ids:
            self._marks.pop(channel_id, None)

    def _hold_until_caught_up(self, channel_id: int) -> None:
        if channel_id not in self._awaiting_catch_up:
            self._awaiting_catch_up.add(channel_id)
            self._hold(channel_id)

    async def _caught_up(self, channel_id: int, guild_id: int) -> None:
        if channel_id in self._awaiting_catch_up:
            self._awaiting_catch_up.discard(channel_id)
            await self._release(channel_id, guild_id)

    def _hold_for_catching_up(self) -> None:
        """Every channel with a mark waits for a catch-up before its mark moves again, and so
        does one whose first mark would be written before then."""
        self._connections += 1
        self._present_until = {}
        for mark in self._marks.values():
            self._present_until[mark.guild_id] = max(self._present_until.get(mark.guild_id, 0), mark.newest_id)
            self._hold_until_caught_up(mark.channel_id)
        self._holding_first_marks = True

    async def note_seen(self, message: discord.Message) -> None:
        """Keep the newest message of an indexed channel: a restart catches up from there."""
        channel = message.channel
        if message.guild is None or not isinstance(channel, MESSAGEABLE) or not self.wants(channel):
            return
        await self._write_mark(channel.id, message.guild.id, message.id)

    @commands.Cog.listener()
    async def on_guild_channel_create(self, channel: discord.abc.GuildChannel | discord.Thread) -> None:
        """A new channel is watched from its first message (its own id is older than all of
        them), so photos posted in it while the bot is away are caught up even if it was quiet
        until then."""
        if isinstance(channel, MESSAGEABLE) and self.wants(channel):
            await self._write_mark(channel.id, channel.guild.id, channel.id)

    @commands.Cog.listener()
    async def on_thread_create(self, thread: discord.Thread) -> None:
        await self.on_guild_channel_create(thread)

    @commands.Cog.listener()
    async def on_guild_join(self, guild: discord.Guild) -> None:
        """Watch the new server's channels from their present messages (older ones are what a
        backfill is for)."""
        await self._catch_up_unmarked(guild)

    @commands.Cog.listener()
    async def on_connect(self) -> None:
        self._hold_for_catching_up()

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """A new gateway session: messages sent while the bot was away were never delivered."""
        self._list_archived = True
        self._start_catching_up()

    @commands.Cog.listener()
    async def on_resumed(self) -> None:
        """A resumed session replays what it missed; the channels held since connecting are
        caught up (most have nothing new) so that their marks move again."""
        self._start_catching_up()

    def _start_catching_up(self) -> None:
        if self._catching_up is not None and not self._catching_up.done():
            self._catch_up_again = True  # channels held since the pass began get their turn
            return
        self._catching_up = asyncio.create_task(self._catch_up_until_done(), name="shoebox-catch-up")

    async def _catch_up_until_done(self) -> tuple[int, int]:
        read = queued = 0
        while True:
            self._catch_up_again = False
            scanned, found = await self.catch_up()
            read, queued = read + scanned, queued + found
            if not self._catch_up_again:
                return read, queued

    async def catch_up(self) -> tuple[int, int]:
        """Queue the photos posted while the bot was away: each held channel with messages newer
        than its mark is read forward from there. Returns (messages read, photos queued).

        A channel that fails, or that is not in the cache (an archived thread), stays held: its
        mark stays where it was, and a later catch-up (or restart) starts from there. After a
        new session, public threads that archived while the bot was away are read as well."""
        read = queued = channels = 0
        connection = self._connections
        list_archived, self._list_archived = self._list_archived, False
        known_threads = {thread.thread_id for thread in await self.bot.jobs.known_threads()}
        for mark in await self.bot.jobs.seen_marks():
            if mark.channel_id not in self._awaiting_catch_up:
                continue
            try:
                channel, reachable = self._catch_up_target(mark)
                if not reachable and await self._deleted_while_away(mark, known_threads):
                    continue
                if channel is not None:
                    scanned, found = await self._catch_up_channel(channel, mark.newest_id)
                    channels, read, queued = channels + 1, read + scanned, queued + found
                if channel is not None or reachable:
                    await self._caught_up(mark.channel_id, mark.guild_id)
            except Exception as error:  # one channel's failure leaves the others to go on
                await self._report_catch_up_failure(mark.channel_id, mark.guild_id, error)
        for guild in self.bot.guilds:
            scanned, found, new_channels = await self._catch_up_unmarked(guild)
            channels, read, queued = channels + new_channels, read + scanned, queued + found
            if list_archived:
                scanned, found, new_channels = await self._catch_up_archived(guild)
                channels, read, queued = channels + new_channels, read + scanned, queued + found
        if connection == self._connections:  # not reconnected meanwhile: that needs a pass of its own
            self._holding_first_marks = False
        if read:
            log.info(
                "Caught up on %d message(s) posted while away, in %d channel(s): %d photo(s) queued",
                read, channels, queued,
            )
        return read, queued

    async def _deleted_while_away(self, mark: SeenMark, known_threads: Set[int]) -> bool:
        """Whether a marked channel missing from the cache was deleted while the bot was away;
        if so, its photos go, as its delete event would have taken them.

        Only Discord's "unknown channel" counts: a thread that archived is missing from the cache
        too, so known threads are not asked about here (a whole-server backfill, which lists every
        archived thread, finds those that were deleted), and one found this way becomes known.
        """
        guild = self.bot.get_guild(mark.guild_id)
        if guild is None or guild.unavailable:
            return False  # the server itself is missing or in an outage: nothing to judge by
        if mark.channel_id in known_threads:
            return False
        return await self._forget_if_deleted(mark.channel_id, mark.guild_id)

    async def _forget_if_deleted(self, channel_id: int, guild_id: int) -> bool:
        """Ask Discord for a channel missing from where it should be; if Discord no longer knows
        it, it was deleted while the bot was away, and its photos go as its delete event would
        have taken them. Any other answer (found, forbidden, an outage) keeps them."""
        try:
            await self.remember_thread(await self.bot.fetch_channel(channel_id))
            return False
        except discord.NotFound:
            pass
        await self._caught_up(channel_id, guild_id)  # its hold released first: no mark written after
        gone = await self.queue.forget_channel(channel_id)
        self._forget_marks([channel_id])
        log.info("Channel %s was deleted while the bot was away: forgot %d photo(s)", channel_id, len(gone))
        return True

    async def _catch_up_archived(self, guild: discord.Guild) -> tuple[int, int, int]:
        """Threads that archived while the bot was away: not in the cache, so neither caught up
        above nor ever seen new. Each readable channel lists its archived threads (see
        `archived_listings`), most recently archived first, up to the first one archived before
        the bot went away (the listing of private threads the bot is in comes by id, so it is
        read through, skipping those); a thread with a mark is read forward from it, one created
        while away from its start. Returns (messages read, photos queued, threads read)."""
        me = guild.me
        present_until = self._present_until.get(guild.id)
        if me is None or present_until is None:
            return 0, 0, 0
        away_since = discord.utils.snowflake_time(present_until)
        read = queued = threads = 0
        for parent in thread_parents(guild, me):
            try:
                for listing, newest_archived_first in archived_listings(parent, me):
                    async for thread in listing:
                        if thread.archive_timestamp < away_since:
                            if newest_archived_first:
                                break
                            continue
                        if not can_read_history(thread, me) or not self.wants(thread):
                            continue
                        mark = self._marks.get(thread.id)
                        new = thread.id > present_until
                        after = mark.newest_id if mark is not None else before_first(thread.id) if new else None
                        scanned, found = await self._read_and_mark(thread, after)
                        threads, read, queued = threads + bool(scanned), read + scanned, queued + found
                        await self._caught_up(thread.id, guild.id)
            except Exception as error:  # one channel's failure leaves the others to go on
                await self._report_catch_up_failure(parent.id, guild.id, error)
        return read, queued, threads

    async def _report_catch_up_failure(self, channel_id: int, guild_id: int, error: Exception) -> None:
        log.warning("Could not catch up on channel %s: %s", channel_id, error)
        await self.bot.jobs.note_error("catch-up", f"<#{channel_id}>: {error}", guild_id, channel_id)

    async def _catch_up_unmarked(self, guild: discord.Guild) -> tuple[int, int, int]:
        """Give each readable channel without a mark one: a channel created after the newest
        message the bot had seen in the server was created while it was away, and is read whole;
        any other starts from its present newest message. Returns (messages read, photos
        queued, channels read).

        A channel that fails stays held and without a mark (or with the mark of the pages it
        got through), so the next catch-up tries it again."""
        me = guild.me
        if me is None:
            return 0, 0, 0
        present_until = self._present_until.get(guild.id)
        read = queued = channels = 0
        for channel in messageable_channels(guild):
            if channel.id in self._marks:  # (a mark from an earlier try: the loop over marks has it)
                continue
            try:
                if can_read_history(channel, me) and self.wants(channel):
                    self._hold_until_caught_up(channel.id)
                    created_while_away = present_until is not None and channel.id > present_until
                    scanned, found = await self._read_and_mark(channel, before_first(channel.id) if created_while_away else None)
                    channels, read, queued = channels + bool(scanned), read + scanned, queued + found
                await self._caught_up(channel.id, guild.id)
            except Exception as error:  # one channel's failure leaves the others to go on
                await self._report_catch_up_failure(channel.id, guild.id, error)
        return read, queued, channels

    async def _read_and_mark(self, channel: Messageable, after_id: int | None) -> tuple[int, int]:
        """Read `channel` forward from `after_id` when it has newer messages (None: nothing to
        read), then mark it as seen up to its newest message. Returns (messages read, photos
        queued)."""
        scanned = found = 0
        if after_id is not None and (channel.last_message_id or 0) > after_id:
            scanned, found = await self._catch_up_channel(channel, after_id)
        await self._store_mark(channel.id, channel.guild.id, channel.last_message_id or channel.id)
        return scanned, found

    def _catch_up_target(self, mark: SeenMark) -> tuple[Messageable | None, bool]:
        """(the channel to read, if it may have unread messages the bot may read; whether it was
        found at all). Not found: gone, or an archived thread, which the cache does not hold."""
        guild = self.bot.get_guild(mark.guild_id)
        channel = guild.get_channel_or_thread(mark.channel_id) if guild is not None else None
        if guild is None or guild.me is None or not isinstance(channel, MESSAGEABLE):
            return None, False
        if not can_read_history(channel, guild.me) or not self.wants(channel):
            return None, True
        last = channel.last_message_id
        if last is None or last <= mark.newest_id:
            return None, True  # nothing new (None: nothing ever posted): no request needed
        return channel, True

    async def _catch_up_channel(self, channel: Messageable, after_id: int) -> tuple[int, int]:
        """Read `channel` forward from `after_id` to the present, queueing photos and moving the
        kept mark along a page at a time (a restart meanwhile goes on from there)."""
        await self.remember_thread(channel)
        read = queued = 0
        page: list[IndexJob] = []
        async for message in channel.history(limit=None, after=discord.Object(after_id), oldest_first=True):
            read += 1
            if self.indexable(message):
                page.extend(jobs_for(message, react=False))
            if read % BACKFILL_PAGE == 0:
                queued += await self._queue_caught_up(channel, page, message.id)
                page = []
        if read:
            queued += await self._queue_caught_up(channel, page, message.id)
        return read, queued

    async def _queue_caught_up(self, channel: Messageable, page: list[IndexJob], newest: int) -> int:
        """Queue a page's photos, then move the mark to its newest message (the reader's own
        progress, so past any hold)."""
        queued = await self.queue.submit(page) if page else 0
        await self._store_mark(channel.id, channel.guild.id, newest)
        return queued

    # ---- backfill ---------------------------------------------------------------------------

    async def backfill_targets(self, guild: discord.Guild) -> list[Messageable]:
        """Channels and threads the bot may read, that the rules let in: archived threads too
        (`archived_listings`), which Discord only lists on request (a thread of last summer's
        trip is archived long since, and its photos are what a backfill is for).

        Listing them all is also when a thread deleted while the bot was away shows: a known
        thread in none of its parent's listings (see `_forget_threads_deleted_while_away`)."""
        me = guild.me
        if me is None:
            return []
        targets: dict[int, Messageable] = {}
        for channel in messageable_channels(guild):
            if can_read_history(channel, me) and self.wants(channel):
                targets[channel.id] = channel
        present = {thread.id for thread in guild.threads}
        listed_parents: set[int] = set()
        for parent in thread_parents(guild, me):
            try:
                for listing, _ in archived_listings(parent, me):
                    async for thread in listing:
                        present.add(thread.id)
                        if can_read_history(thread, me) and self.wants(thread):
                            targets.setdefault(thread.id, thread)
                listed_parents.add(parent.id)
            except discord.HTTPException as error:
                log.info("Cannot list the archived threads of #%s: %s", parent.name, error)
        await self._forget_threads_deleted_while_away(guild, present, listed_parents)
        return list(targets.values())

    async def _forget_threads_deleted_while_away(
        self, guild: discord.Guild, present: Set[int], listed_parents: Set[int]
    ) -> None:
        """A thread deleted while the bot was away sent no delete event, and its photos would stay
        findable by whoever reads its parent. One the bot knows, of a parent whose archived
        threads were all listed, that is neither in the cache nor in a listing is asked about (a
        private thread the bot may not list is in none either), and forgotten if it is gone."""
        for known in await self.bot.jobs.known_threads(guild.id):
            if known.parent_id in listed_parents and known.thread_id not in present:
                try:
                    await self._forget_if_deleted(known.thread_id, guild.id)
                except discord.HTTPException as error:
                    log.info("Could not check whether thread %s still exists: %s", known.thread_id, error)

    def is_backfilling(self, channel_id: int) -> bool:
        return channel_id in self._backfilling

    async def backfill(
        self,
        channel: Messageable,
        limit: int | None = None,
        progress: Progress | None = None,
        restart: bool = False,
    ) -> BackfillState:
        """Queue the photos of up to `limit` older messages (all when None), resuming a previous run.

        Progress is saved after every page, so a restart (of the bot or of the command) continues
        from the oldest message already scanned. A completed channel is not scanned again unless
        `restart` is set; new posts are indexed live anyway.
        """
        if channel.id in self._backfilling:
            raise BackfillBusy(f"#{channel.name} is already being backfilled")
        self._backfilling[channel.id] = channel
        try:
            return await self._backfill(channel, limit, progress, restart)
        finally:
            del self._backfilling[channel.id]

    async def _backfill(
        self, channel: Messageable, limit: int | None, progress: Progress | None, restart: bool
    ) -> BackfillState:
        store = self.bot.jobs
        state = None if restart else await store.backfill_state(channel.id)
        if state is None:
            state = BackfillState(channel.id, channel.guild.id, None)
        elif state.done:
            return state
        await self.remember_thread(channel)
        before = discord.Object(state.before_id) if state.before_id else None
        # Walking the history also shows which indexed messages are gone: deleted while the bot
        # was away, when no delete event reached it. Below the walk's top: the message it resumes
        # under, or (from the newest) a minute before it started, so a post arriving meanwhile,
        # newer than the first page, is never taken for deleted.
        indexed = sorted(
            {s.message_id for s in await self.bot.library.catalog.find_sources("channel_id", channel.id)
             if s.message_id is not None}
        )
        upper = before.id if before else discord.utils.time_snowflake(discord.utils.utcnow() - RECENT_MARGIN)
        seen = unsaved = 0
        page: list[IndexJob] = []
        page_ids: set[int] = set()
        oldest: int | None = None
        async for message in channel.history(limit=limit, before=before, oldest_first=False):
            if before is None and seen == 0:
                await self.note_seen(message)  # the newest message: a restart catches up from here
            seen += 1
            unsaved += 1
            oldest = message.id
            page_ids.add(message.id)
            if self.indexable(message):
                page.extend(jobs_for(message, react=False))
            if seen % BACKFILL_PAGE == 0:
                await self._forget_deleted(channel, unseen_between(indexed, oldest, upper, page_ids))
                state = await self._save_step(state, page, unsaved, oldest, False, progress)
                page, unsaved, page_ids, upper = [], 0, set(), oldest
        done = limit is None or seen < limit
        lower = 0 if done else (oldest or upper)  # done: nothing is older than the last page
        await self._forget_deleted(channel, unseen_between(indexed, lower, upper, page_ids))
        return await self._save_step(state, page, unsaved, oldest, done, progress)

    async def _forget_deleted(self, channel: Messageable, message_ids: list[int]) -> None:
        if message_ids:
            gone = await self.queue.forget_messages(message_ids, guild_id=channel.guild.id)
            log.info(
                "Backfill of #%s: %d message(s) were deleted while I was away; forgot %d photo(s)",
                channel.name, len(message_ids), len(gone),
            )

    async def _save_step(
        self,
        state: BackfillState,
        page: list[IndexJob],
        scanned: int,
        oldest: int | None,
        done: bool,
        progress: Progress | None,
    ) -> BackfillState:
        """Queue one page's photos (waiting for room if the queue is full), then record the step.

        Nothing is recorded once the bot has left the server (the wait for room can outlast it):
        joining again must start afresh, as leaving forgot everything else about the server."""
        queued = await self.queue.submit(page) if page else 0
        state = replace(
            state,
            before_id=oldest or state.before_id,
            scanned=state.scanned + scanned,
            queued=state.queued + queued,
            done=done,
        )
        if self.bot.get_guild(state.guild_id) is None:
            return state
        await self.bot.jobs.save_backfill(state)
        if progress is not None:
            await progress(state)
        return state


async def setup(bot: "ShoeboxBot") -> None:
    await bot.add_cog(Indexing(bot))
