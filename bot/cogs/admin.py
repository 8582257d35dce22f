"""Administration: the `/shoebox` commands for server managers, and "Forget these photos" for all.

`/shoebox` is a `GroupCog` marked `default_permissions(manage_guild=True)` and `guild_only`, so
Discord shows it only to members who may manage the server (admins can change that in Server
Settings > Integrations). Because that default can be overridden per server, every command also
checks Manage Server at run time (`interaction_check`). All replies are ephemeral.

Long jobs (re-embedding, backfill) report progress by editing one message at most every couple of
seconds instead of posting many. Discord lets an interaction's message be edited for 15 minutes;
after that the job carries on silently and `/shoebox status` shows where it is.

The message context-menu command "Forget these photos" works for the message's author and for
moderators (Manage Messages in that channel); anyone else is told, politely, that it is not theirs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.access import readable_now
from bot.discord_app import explain_check_failure, send_ephemeral
from bot.jobs import KEEP_ERRORS, BackfillState
from bot.scope import can_read_history
from store.db import SourceFilter
from store.library import ReindexIncomplete

if TYPE_CHECKING:
    from bot.cogs.indexing import Indexing
    from bot.discord_app import ShoeboxBot

log = logging.getLogger(__name__)

MESSAGE_LINK = re.compile(
    r"https?://(?:(?:ptb|canary)\.)?discord(?:app)?\.com/channels/(\d+|@me)/(\d+)/(\d+)"
)
SNOWFLAKE_LIMIT = 2**63  # Discord ids are 64-bit and fit a signed SQLite INTEGER
TOKEN_LIFETIME = 14 * 60  # interaction messages can be edited for 15 minutes; stop a little before
_THREADS = (discord.ChannelType.public_thread, discord.ChannelType.private_thread, discord.ChannelType.news_thread)
_MESSAGE_CHANNELS = (discord.ChannelType.text, discord.ChannelType.news, discord.ChannelType.voice,
                     discord.ChannelType.stage_voice, *_THREADS)


class ChannelOption(app_commands.Transformer):
    """A channel option of the given kinds, resolved from the cache or else fetched.

    discord.py's own channel options only resolve what is cached, and an archived thread is not:
    picking one failed with an unreadable error. Fetching it gives the real thread to work on.
    """

    def __init__(self, *kinds: discord.ChannelType) -> None:
        self.kinds = list(kinds)

    @property
    def type(self) -> discord.AppCommandOptionType:
        return discord.AppCommandOptionType.channel

    @property
    def channel_types(self) -> list[discord.ChannelType]:
        return self.kinds

    async def transform(self, interaction: discord.Interaction, value: Any, /) -> Any:
        channel = value.resolve()
        if channel is None:
            try:
                channel = await value.fetch()
            except discord.HTTPException:
                raise app_commands.TransformerError(value, self.type, self) from None
        return channel


ChannelArg = app_commands.Transform[discord.abc.GuildChannel | discord.Thread, ChannelOption(*_MESSAGE_CHANNELS)]
RuleTarget = app_commands.Transform[
    discord.abc.GuildChannel | discord.Thread,
    ChannelOption(*_MESSAGE_CHANNELS, discord.ChannelType.category, discord.ChannelType.forum, discord.ChannelType.media),
]


def parse_message_link(text: str) -> tuple[int | None, int, int] | None:
    """(guild id or None for DMs, channel id, message id) from a Discord message link."""
    match = MESSAGE_LINK.search(text.strip())
    if match is None:
        return None
    guild = None if match.group(1) == "@me" else int(match.group(1))
    ids = (int(match.group(2)), int(match.group(3)), guild or 0)
    if any(i >= SNOWFLAKE_LIMIT for i in ids):
        return None  # mistyped: no Discord id is that long (and SQLite could not store it)
    return guild, ids[0], ids[1]


class ProgressMessage:
    """One ephemeral message that a long job keeps editing, throttled to `interval` seconds."""

    def __init__(self, interaction: discord.Interaction, interval: float) -> None:
        self.interaction = interaction
        self.interval = interval
        self.started = time.monotonic()
        self._last_edit = 0.0
        self._shown: str | None = None
        self._broken = False

    async def show(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if self._broken or text == self._shown:
            return
        if not final and now - self._last_edit < self.interval:
            return
        if now - self.started > TOKEN_LIFETIME:
            self._broken = True  # the interaction token expired; status shows the rest
            return
        try:
            await self.interaction.edit_original_response(content=text)
        except discord.HTTPException as error:
            log.info("Stopped updating a progress message: %s", error)
            self._broken = True
            return
        self._shown, self._last_edit = text, now


# Managing a server does not open every channel in it: a channel the admin cannot read is named
# only as this, and neither its file names nor its counts are shown.
HIDDEN_CHANNEL = "a channel you cannot view"
# The library is one for every server the bot is in, and re-embedding it pauses them all.
SHARED_REINDEX = (
    "Re-indexing re-embeds the photos of every server this bot is in, and pauses indexing in all "
    "of them while it runs, so only the bot's owner can start it."
)


def fit_lines(lines: list[str], limit: int = 2000) -> str:
    """The lines as one Discord message: all of them when they fit; else as many whole lines as
    fit (at least the start of the first), then how many were left out."""
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    room = limit - len(f"\n… and {len(lines):,} more")
    kept = [lines[0][:room]]
    size = len(kept[0])
    for line in lines[1:]:
        if size + 1 + len(line) > room:
            break
        kept.append(line)
        size += 1 + len(line)
    return "\n".join(kept) + f"\n… and {len(lines) - len(kept):,} more"


def _state_line(channel: str | None, state: BackfillState, running: bool = True) -> str:
    """One channel's backfill; `channel` None for one the admin cannot view (no name, no counts)."""
    status = "done" if state.done else "in progress" if running else "stopped: `/shoebox backfill` goes on from here"
    if channel is None:
        return f"{HIDDEN_CHANNEL}: {status}"
    return f"{channel}: {state.scanned:,} messages scanned, {state.queued:,} photos queued ({status})"


def _share_done(done: int, total: int) -> str:
    """How far a re-index is, as a share: it runs over every server's photos, and their number
    is not for the admins of one to know."""
    return f"{100 * done // total if total else 0}%"


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Admin(commands.GroupCog, group_name="shoebox", group_description="Manage Shoebox in this server"):
    """Server-manager commands. Discord hides them from others; the check below enforces it."""

    def __init__(self, bot: "ShoeboxBot") -> None:
        self.bot = bot
        self._reindexing = asyncio.Lock()
        self._reindex_progress: tuple[int, int] | None = None  # (done, total) while one runs
        super().__init__()

    @property
    def indexing(self) -> "Indexing":
        cog = self.bot.get_cog("Indexing")
        assert cog is not None, "the indexing cog is not loaded"
        return cog  # type: ignore[return-value]

    async def _readable_by(self, admin: discord.Member | discord.User, guild: discord.Guild) -> set[int]:
        """The channels and threads whose photos, names and problems this admin may be shown."""
        if not isinstance(admin, discord.Member):
            return set()
        return await readable_now(self.bot.http, guild, admin, await self.bot.jobs.known_threads(guild.id))

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.guild is None:
            raise app_commands.NoPrivateMessage()
        if not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True

    async def cog_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        text = explain_check_failure(error)
        if text is not None:
            interaction.extras["error_handled"] = True
            await send_ephemeral(interaction, text)

    # ---- status -----------------------------------------------------------------------------

    @app_commands.command(name="status", description="Photos indexed, model, queue and recent problems")
    async def status(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        guild = interaction.guild
        assert guild is not None
        # Only this server's figures and problems, and of it only the channels this admin can
        # view: its admins are not those of the others, and managing a server does not open
        # every channel in it.
        library = self.bot.library
        readable = await self._readable_by(interaction.user, guild)
        here = await library.catalog.visible_image_ids(
            SourceFilter(channel_ids=frozenset(readable), guild_ids=frozenset({guild.id}), include_files=False)
        )
        queue = self.indexing.queue
        counters = queue.counters_of(readable)
        lines = [
            "**Shoebox status** (the channels you can view)",
            f"Photos from this server: **{len(here):,}**",
            f"Model: `{library.embedder.model_id}`",
            f"Queue: {await queue.pending(guild.id, readable):,} waiting"
            + ("" if queue.running else " (worker stopped!)")
            + f" · since start: {counters.indexed:,} indexed, "
            f"{counters.rejected:,} not photos, {counters.gave_up:,} gave up",
        ]
        if self._reindex_progress is not None:
            lines.append(f"Re-index: running, {_share_done(*self._reindex_progress)} done (new photos wait for it)")
        rules = self.indexing.rules_of(guild.id)
        if rules:
            described = ", ".join(f"{mode} <#{cid}>" for cid, mode in sorted(rules.items()))
            lines.append(f"Channel rules: {described}")
        else:
            lines.append("Channel rules: none (every channel I can read)")
        states = [s for s in await self.bot.jobs.backfill_states(guild.id) if s.channel_id in readable]
        for state in states[:5]:
            running = self.indexing.is_backfilling(state.channel_id)
            lines.append("Backfill " + _state_line(f"<#{state.channel_id}>", state, running))
        if len(states) > 5:
            lines.append(f"… and {len(states) - 5:,} more backfilled channel(s)")
        noted = await self.bot.jobs.recent_errors(KEEP_ERRORS, guild.id)
        # Each problem names the channel it is about; rows from before channels were kept are
        # not shown, as their channel cannot be told.
        errors = [e for e in noted if e.channel_id in readable][:5]
        if errors:
            lines.append("Recent problems:")
            lines += [f"• {e.at} {e.place}: {e.message}" for e in errors]
        await interaction.followup.send(fit_lines(lines), ephemeral=True)

    # ---- reindex ----------------------------------------------------------------------------

    @app_commands.command(name="reindex", description="Re-embed every photo with the current model")
    async def reindex(self, interaction: discord.Interaction) -> None:
        if len(self.bot.guilds) > 1 and not await self._owns_the_bot(interaction.user):
            await interaction.response.send_message(SHARED_REINDEX, ephemeral=True)
            return
        if self._reindexing.locked():
            await interaction.response.send_message("A re-index is already running.", ephemeral=True)
            return
        # Taken before the first await: a second admin asking meanwhile is told it is running.
        async with self._reindexing:
            await interaction.response.send_message("Re-indexing: starting…", ephemeral=True)
            progress = ProgressMessage(interaction, self.bot.config.progress_interval)
            latest = [0, 0]

            def note(done: int, total: int) -> None:
                latest[0], latest[1] = done, total
                self._reindex_progress = (done, total)

            async def ticker() -> None:
                while True:
                    await asyncio.sleep(max(self.bot.config.progress_interval, 0.05))
                    if latest[1]:
                        await progress.show(f"Re-indexing: {latest[0]:,} / {latest[1]:,} photos…")

            async with self.indexing.queue.paused():
                tick = asyncio.create_task(ticker())
                try:
                    library = self.bot.library
                    total = await library.reindex(library.embedder, note)
                except ReindexIncomplete as error:
                    log.warning("Re-index left the old vectors in place: %s", error)
                    why = (
                        f"{len(error.image_ids):,} photo(s) have no readable stored copy"
                        if error.image_ids else "new photos kept arriving from another indexer"
                    )
                    await progress.show(
                        f"Re-indexing stopped: {why}, so search keeps the current vectors. "
                        "`shoebox verify` on the host lists any problem; run it again to resume.",
                        final=True,
                    )
                    return
                finally:
                    tick.cancel()
                    self._reindex_progress = None
        await progress.show(f"Re-indexed {total:,} photos with `{self.bot.library.embedder.model_id}`.", final=True)

    async def _owns_the_bot(self, user: discord.abc.User) -> bool:
        """Whether `user` owns the bot's application (or is on its team); no answer means no."""
        try:
            return await self.bot.is_owner(user)  # type: ignore[arg-type]
        except discord.HTTPException as error:
            log.warning("Could not look up the bot's owner: %s", error)
            return False

    # ---- backfill ---------------------------------------------------------------------------

    @app_commands.command(name="backfill", description="Index photos already posted (resumes where it stopped)")
    @app_commands.describe(
        channel="Only this channel (default: every channel I can read)",
        limit="How many messages to scan per channel in this run (default: all)",
        restart="Scan from the newest message again, even where a backfill finished",
    )
    async def backfill(
        self,
        interaction: discord.Interaction,
        channel: ChannelArg | None = None,
        limit: app_commands.Range[int, 1, 10_000_000] | None = None,
        restart: bool = False,
    ) -> None:
        from bot.cogs.indexing import BackfillBusy

        guild = interaction.guild
        assert guild is not None
        indexing = self.indexing
        if channel is not None:
            resolved = guild.get_channel_or_thread(channel.id) or channel
            if not indexing.wants(resolved):  # type: ignore[arg-type]
                await interaction.response.send_message(
                    f"{channel.mention} is excluded by the channel rules (`/shoebox channels`).", ephemeral=True
                )
                return
            targets = [resolved]
            opening = "Backfill: starting on 1 channel(s)…"
        else:
            # Listing archived threads is a request per channel: answered first, within the 3 s
            # Discord gives an interaction.
            opening = "Backfill: looking for channels and threads…"
        await interaction.response.send_message(opening, ephemeral=True)
        progress = ProgressMessage(interaction, self.bot.config.progress_interval)
        if channel is None:
            targets = await indexing.backfill_targets(guild)
            if not targets:
                await progress.show("There is no channel here I can read.", final=True)
                return
            await progress.show(f"Backfill: starting on {len(targets)} channel(s)…", final=True)
        finished: list[str] = []
        admin = interaction.user
        readable = await self._readable_by(admin, guild)

        def admin_reads(target: object) -> bool:
            """A public thread not yet known (archived, not in the cache) is read through its
            parent; a private one only where `readable` has it (membership decides)."""
            if getattr(target, "id", None) in readable:
                return True
            return (
                isinstance(target, discord.Thread) and not target.is_private()
                and isinstance(admin, discord.Member) and can_read_history(target, admin)
            )

        for number, target in enumerate(targets, start=1):
            header = f"Backfill {number}/{len(targets)}"
            # A whole-server backfill also reads channels this admin cannot view: named for them
            # only as that, with no counts.
            label = target.mention if admin_reads(target) else None

            async def report(state: BackfillState, header: str = header, label: str | None = label) -> None:
                await progress.show(f"{header}: " + _state_line(label, state))

            try:
                state = await indexing.backfill(target, limit, report, restart)  # type: ignore[arg-type]
            except BackfillBusy as error:
                finished.append(f"{label or HIDDEN_CHANNEL}: {'already being backfilled' if label is None else error}")
                continue
            except discord.Forbidden:
                finished.append(f"{label or HIDDEN_CHANNEL}: I may not read its history")
                continue
            except (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
                # Discord refused, or the connection dropped (discord.py retries a reset only
                # with macOS's and Windows' error codes): this channel stops, the others go on.
                why = error.status if isinstance(error, discord.HTTPException) else "connection lost"
                log.warning("Backfill of %s stopped: %r", target, error)
                await self.bot.jobs.note_error(
                    "backfill", f"#{getattr(target, 'name', target)}: {error or why}", guild.id, target.id
                )
                finished.append(f"{label or HIDDEN_CHANNEL}: stopped ({why}); run it again to resume")
                continue
            finished.append(_state_line(label, state, running=False))
        summary = fit_lines(["Backfill finished; the photos are being indexed now.", *finished])
        await progress.show(summary, final=True)

    # ---- channels ---------------------------------------------------------------------------

    @app_commands.command(name="channels", description="Choose which channels are indexed")
    @app_commands.describe(
        action="list the rules; include or exclude a channel; remove its rule; or clear every rule",
        channel="The channel, category or thread",
    )
    async def channels(
        self,
        interaction: discord.Interaction,
        action: Literal["list", "include", "exclude", "remove", "clear"],
        channel: RuleTarget | None = None,
    ) -> None:
        guild = interaction.guild
        assert guild is not None
        indexing = self.indexing
        if action in {"include", "exclude", "remove"} and channel is None:
            await interaction.response.send_message(f"Name the channel to {action}.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        if action == "clear":
            await indexing.clear_rules(guild.id)
            text = "Cleared every rule: I index every channel I can read."
        elif action == "include" and channel is not None:
            await indexing.set_rule(guild.id, channel.id, "include")
            text = (
                f"Including {channel.mention}. With an include rule, only included channels are indexed; "
                "photos already indexed from other channels stay searchable until excluded."
            )
        elif action == "exclude" and channel is not None:
            await indexing.set_rule(guild.id, channel.id, "exclude")
            forgotten = await self._forget_excluded(channel, await self._readable_by(interaction.user, guild))
            text = f"Excluded {channel.mention}: it is no longer indexed, and {forgotten} photo(s) from it were forgotten."
        elif action == "remove" and channel is not None:
            await indexing.set_rule(guild.id, channel.id, None)
            text = f"Removed the rule for {channel.mention}."
        else:
            text = ""
        rules = indexing.rules_of(guild.id)
        listing = "\n".join(f"• {mode} <#{cid}>" for cid, mode in sorted(rules.items())) or "• none: every channel I can read"
        await interaction.followup.send(f"{text}\n**Rules**\n{listing}".strip()[:2000], ephemeral=True)

    async def _forget_excluded(self, channel: discord.abc.Snowflake, readable: set[int]) -> int:
        """Forget the photos of an excluded channel, or of every channel in an excluded category,
        their threads' too; returns how many of them were posted where the admin can view.

        A category can hold channels its admin cannot view: their photos go without a word, as
        `status` does not count them either. Each photo posted is counted, not each stored image
        that goes: an image stays while a copy of it is posted elsewhere, and that is not this
        admin's to know.
        """
        catalog = self.bot.library.catalog
        forgotten = 0
        for cid in {channel.id} | {c.id for c in getattr(channel, "channels", [])}:
            for place in {cid, *await self.bot.jobs.threads_of(cid)} & readable:
                forgotten += len(await catalog.find_sources("channel_id", place))
            await self.indexing.queue.forget_channel(cid, excluded=True)
        return forgotten

    # ---- forget -----------------------------------------------------------------------------

    @app_commands.command(name="forget", description="Forget the photos of one message (paste its link)")
    @app_commands.describe(link="The message link (right-click the message > Copy Message Link)")
    async def forget(self, interaction: discord.Interaction, link: str) -> None:
        parsed = parse_message_link(link)
        if parsed is None:
            await interaction.response.send_message("That is not a message link.", ephemeral=True)
            return
        guild_id, channel_id, message_id = parsed
        guild = interaction.guild
        if guild is None or guild_id != guild.id:
            await interaction.response.send_message("That message is not in this server.", ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        count = 0
        # A channel this admin cannot view, or a message that is not in the link's channel, gets
        # the answer a message without photos gets: no word on whether it had any.
        if channel_id in await self._readable_by(interaction.user, guild) and await self._message_is_in(
            guild, channel_id, message_id
        ):
            count = await forget_message_photos(self.bot, guild_id, message_id)
        text = f"Forgot {count} photo(s) from that message." if count else "I had no photos from that message."
        await interaction.followup.send(text, ephemeral=True)

    async def _message_is_in(self, guild: discord.Guild, channel_id: int, message_id: int) -> bool:
        """Whether a pasted link's message was posted in the link's channel.

        Anyone can write a link's ids, and a channel's photos are for those who can view it. A
        message's indexed photos say where it was posted, even once it was deleted while the bot
        was away; any other message (queued, not read yet, forgotten before) is looked for in that
        channel, where Discord finds it or not.
        """
        sources = await self.bot.library.catalog.sources_for_messages([message_id])
        if any(s.guild_id == guild.id and s.channel_id == channel_id for s in sources):
            return True
        try:
            await self.bot.get_partial_messageable(channel_id, guild_id=guild.id).fetch_message(message_id)
        except discord.HTTPException:
            return False
        return True


async def forget_message_photos(bot: "ShoeboxBot", guild_id: int, message_id: int) -> int:
    """Forget a message's photos (indexed or still queued) posted in this server; returns how
    many were indexed. The server is checked on every source, not only on the link: a link can
    pair this server's id with another server's message."""
    sources = [s for s in await bot.library.catalog.sources_for_messages([message_id]) if s.guild_id == guild_id]
    indexing = bot.get_cog("Indexing")
    if indexing is not None:
        await indexing.queue.forget_messages([message_id], guild_id=guild_id, for_good=True)  # type: ignore[attr-defined]
    else:
        await bot.library.forget_messages([message_id], guild_id)
    return len(sources)


class ForgetMenu(commands.Cog):
    """The "Forget these photos" message command, for the author and for moderators."""

    def __init__(self, bot: "ShoeboxBot") -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Forget these photos", callback=self.forget_photos)
        self.menu.guild_only = True

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    async def forget_photos(self, interaction: discord.Interaction, message: discord.Message) -> None:
        user = interaction.user
        is_author = message.author.id == user.id
        is_moderator = interaction.permissions.manage_messages
        if not (is_author or is_moderator):
            await interaction.response.send_message(
                "Sorry, only the person who posted these photos or a moderator can make me forget them.",
                ephemeral=True,
            )
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        count = await forget_message_photos(self.bot, message.guild.id, message.id) if message.guild else 0
        text = (
            f"Done: I forgot {count} photo(s) from that message. The message itself is untouched."
            if count
            else "I had no photos from that message (anything still queued is dropped)."
        )
        await interaction.followup.send(text, ephemeral=True)


async def setup(bot: "ShoeboxBot") -> None:
    await bot.add_cog(Admin(bot))
    await bot.add_cog(ForgetMenu(bot))
