"""`shoebox bot`: the Discord front end — one `commands.Bot` subclass and the code that runs it.

The bot is a thin layer: Discord events in, the library or the agent in the middle, Discord
messages out. Its services (the photo library, the agent, the bot's own job store) are created in
`setup_hook` — after the login succeeded, so a wrong token fails in a second instead of after the
model has loaded — or passed in ready-made, which is how the tests drive it. Features live in one
cog each (`bot/cogs/`): indexing, asking, administration.

Errors are handled in layers: each cog answers the failures it understands, `ShoeboxTree.on_error`
is the fallback for every slash command, and `on_error` logs any event handler that raised. None
of them lets a traceback reach a Discord user or stop the bot.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, Sequence

import discord
from discord import app_commands
from discord.ext import commands

from bot.jobs import DB_FILE, JobStore, QueueSettings
from store.library import Library
from store.settings import Settings, SettingsError, env_int, env_switch, env_text

log = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.indexing", "bot.cogs.ask", "bot.cogs.admin", "bot.cogs.captions")
DEFAULT_REACTION = "\N{CAMERA WITH FLASH}"


# ---- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BotSettings:
    """The bot's own knobs (the library's and Claude's are in store/settings.py and bot/llm.py)."""

    token: str | None = None
    dev_guild: int | None = None  # sync slash commands to this guild only (instant; for development)
    sync_commands: bool = True
    reaction: str | None = DEFAULT_REACTION  # None: index silently
    answer_timeout: float = 180.0
    progress_interval: float = 2.0  # seconds between edits of a progress message
    queue: QueueSettings = field(default_factory=QueueSettings)

    @classmethod
    def from_env(cls, max_file_bytes: int | None = None) -> "BotSettings":
        dev_guild = env_text("SHOEBOX_DEV_GUILD")
        if dev_guild is not None and not dev_guild.isdigit():
            raise SettingsError(f"SHOEBOX_DEV_GUILD must be a server id (digits), got {dev_guild!r}")
        reaction = env_text("SHOEBOX_REACTION")
        if reaction is not None and reaction.lower() in {"off", "none", "no", "false"}:
            reaction_value: str | None = None
        else:
            reaction_value = reaction or DEFAULT_REACTION
        queue = QueueSettings(
            max_pending=env_int("SHOEBOX_QUEUE_MAX", 5000, 1),
            batch_size=env_int("SHOEBOX_QUEUE_BATCH", 16, 1),
        )
        if max_file_bytes is not None:
            queue = replace(queue, max_file_bytes=max_file_bytes)
        return cls(
            token=env_text("DISCORD_TOKEN"),
            dev_guild=int(dev_guild) if dev_guild else None,
            sync_commands=env_switch("SHOEBOX_SYNC_COMMANDS", True),
            reaction=reaction_value,
            answer_timeout=float(env_int("SHOEBOX_ANSWER_TIMEOUT", 180, 5)),
            queue=queue,
        )


# ---- what the bot needs from the agent ----------------------------------------------------------


class AgentLike(Protocol):
    """The agent's entry point (bot.agent.Agent); a protocol so the bot never imports it eagerly."""

    async def answer(
        self, question: str, scope: Any, attachments: Sequence[Any] = (), history: Sequence[Any] = ()
    ) -> Any: ...


def make_agent(library: Library) -> AgentLike:
    """The Claude agent, online when ANTHROPIC_API_KEY is set and in offline mode otherwise."""
    from bot.agent import Agent
    from bot.llm import AgentSettings, make_client

    settings = AgentSettings.from_env()
    return Agent(library, settings, make_client(settings))


# ---- small helpers shared by the cogs ----------------------------------------------------------


def bot_intents() -> discord.Intents:
    """Only what Shoebox uses. `message_content` is privileged: enable it in the Developer Portal."""
    intents = discord.Intents.none()
    intents.guilds = True  # channels, roles and threads: needed to compute who may see what
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True  # attachments and text of messages that don't mention the bot
    return intents


# What the bot asks for when invited: read and index photos (View Channels, Read Message
# History), answer with them (Send Messages, and in threads Send Messages in Threads, which
# Discord counts apart; Attach Files, Embed Links), acknowledge (Add Reactions), slash commands.
INVITE_PERMISSIONS = discord.Permissions(
    view_channel=True, read_message_history=True, send_messages=True, send_messages_in_threads=True,
    attach_files=True, embed_links=True, add_reactions=True, use_application_commands=True,
)


def invite_url(application_id: int) -> str:
    """The link that adds the bot to a server with `INVITE_PERMISSIONS` and its slash commands."""
    return discord.utils.oauth_url(
        application_id, permissions=INVITE_PERMISSIONS, scopes=("bot", "applications.commands")
    )


def mentions_pattern(user_id: int, role_id: int | None = None) -> re.Pattern[str]:
    """Mentions of the bot: of its user, and of its own role when it has one."""
    role = rf"|<@&{role_id}>" if role_id is not None else ""
    return re.compile(rf"<@!?{user_id}>{role}")


def own_role_id(guild: discord.Guild | None) -> int | None:
    """The id of the role Discord made for the bot in `guild`. It has the bot's name and sits
    beside the bot in the mention list, so people mention it meaning the bot."""
    role = guild.self_role if guild is not None else None
    return role.id if role is not None else None


PEOPLES_MESSAGES = (discord.MessageType.default, discord.MessageType.reply)


def addresses_bot(message: discord.Message, me: discord.abc.User) -> bool:
    """Is this message a question to the bot: a DM, a mention, or a reply to one of its messages?

    Only messages people wrote count. Discord's system messages carry references too: starting a
    thread from one of the bot's answers posts one that points at the answer, in the asker's name.
    """
    if message.type not in PEOPLES_MESSAGES:
        return False
    if message.guild is None:
        # A DM, or a server's message whose server is missing from the cache: the latter must
        # never be answered, in a channel others read, with a DM's scope (all shared servers).
        return isinstance(message.channel, discord.DMChannel)
    if any(user.id == me.id for user in message.mentions):
        return True
    if own_role_id(message.guild) in message.raw_role_mentions:
        return True
    reference = message.reference
    if reference is not None and isinstance(reference.resolved, discord.Message):
        return reference.resolved.author.id == me.id
    return False


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """Answer an interaction privately, whether or not it was answered or deferred already."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as error:
        log.warning("Could not answer interaction %s: %s", interaction.id, error)


_PERMISSION_NAMES = {"manage_guild": "Manage Server", "view_channel": "View Channels"}


def permission_names(names: Sequence[str]) -> str:
    """Permissions as Discord's settings screens call them (manage_guild is "Manage Server")."""
    return ", ".join(_PERMISSION_NAMES.get(n, n.replace("_", " ").title()) for n in names)


def explain_check_failure(error: app_commands.AppCommandError) -> str | None:
    """A polite sentence for the failures a person causes; None for the ones that are bugs."""
    if isinstance(error, app_commands.NoPrivateMessage):
        return "That only works inside a server."
    if isinstance(error, app_commands.MissingPermissions):
        return f"Sorry, you need the {permission_names(error.missing_permissions)} permission for that."
    if isinstance(error, app_commands.BotMissingPermissions):
        return f"I am missing the {permission_names(error.missing_permissions)} permission here."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down a little: try again in {error.retry_after:.0f}s."
    if isinstance(error, app_commands.CheckFailure):
        return "Sorry, you can't use that here."
    if isinstance(error, app_commands.TransformerError):
        name = getattr(error.value, "name", None)
        if name is not None:  # a channel, role or member that could not be looked up
            return f"I can't reach {name} right now: check that I can see it, then try again."
        return f"I couldn't understand “{error.value}”."
    return None


class ShoeboxTree(app_commands.CommandTree):
    """The command tree with the last-resort error handler."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if interaction.extras.get("error_handled"):
            return
        text = explain_check_failure(error)
        if text is None:
            command = interaction.command.qualified_name if interaction.command else "?"
            log.error("Slash command /%s failed", command, exc_info=error)
            text = "Sorry, something went wrong there. It has been logged for the server admin."
        await send_ephemeral(interaction, text)


# ---- the bot -----------------------------------------------------------------------------------


class ShoeboxBot(commands.Bot):
    """The Discord client. Services may be passed in; whatever is missing is built in `setup_hook`."""

    def __init__(
        self,
        settings: Settings,
        config: BotSettings,
        *,
        library: Library | None = None,
        agent: AgentLike | None = None,
        jobs: JobStore | None = None,
    ) -> None:
        # Shoebox never joins voice: skip discord.py's warnings about the optional voice libraries.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=bot_intents(),
            help_command=None,
            tree_cls=ShoeboxTree,
            allowed_mentions=discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=False),
        )
        self.settings = settings
        self.config = config
        self.library: Library = library  # type: ignore[assignment]  # set in setup_hook when None
        self.agent: AgentLike = agent  # type: ignore[assignment]
        self.jobs: JobStore = jobs  # type: ignore[assignment]
        self._owns_library = library is None
        self._owns_jobs = jobs is None

    async def setup_hook(self) -> None:
        if self.library is None:
            from store.embedder import load_embedder

            log.info("Loading the CLIP model %s ...", self.settings.clip.model)
            loop = asyncio.get_running_loop()
            embedder = await loop.run_in_executor(None, load_embedder, self.settings.clip)
            self.library = await Library.open(self.settings, embedder)
        if self.jobs is None:
            self.jobs = await JobStore.open(Path(self.settings.data_dir) / DB_FILE)
        if self.agent is None:
            self.agent = make_agent(self.library)
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.config.sync_commands:
            await self.sync_commands()

    async def sync_commands(self) -> None:
        """Publish the slash commands: to the dev guild only (instant) or globally."""
        try:
            if self.config.dev_guild:
                guild = discord.Object(self.config.dev_guild)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("Synced %d application commands to guild %s", len(synced), self.config.dev_guild)
            else:
                synced = await self.tree.sync()
                log.info("Synced %d application commands globally", len(synced))
        except discord.HTTPException as error:
            log.warning("Could not sync slash commands (the old ones stay): %s", error)

    async def on_ready(self) -> None:
        log.info("Connected as %s to %d server(s)", self.user, len(self.guilds))
        if not self.guilds and self.application_id is not None:
            log.info("Not in any server yet: add the bot with %s", invite_url(self.application_id))

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: every feature listens in its own cog."""

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        log.exception("Unhandled error in %s", event_method)

    async def close(self) -> None:
        try:
            await super().close()  # unloads the cogs, which stops the indexing worker
        finally:
            if self._owns_jobs and self.jobs is not None:
                await self.jobs.close()
            if self._owns_library and self.library is not None:
                await self.library.close()


# ---- running it ---------------------------------------------------------------------------------


async def run_bot(settings: Settings, config: BotSettings) -> int:
    """Run until stopped; 0 on a clean stop, 1 (with one log line saying why) when it cannot start."""
    from store.db import DatabaseUnavailable
    from store.embedder import ModelUnavailable
    from store.library import ModelMismatch

    if not config.token:
        log.error(
            "DISCORD_TOKEN is not set: create a bot in the Discord Developer Portal, copy its token "
            "and put DISCORD_TOKEN=... in .env (or the environment)."
        )
        return 1
    bot = ShoeboxBot(settings, config)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(bot.close()))
    except (NotImplementedError, RuntimeError):
        pass  # not on the main thread or not supported: Ctrl-C still works
    try:
        async with bot:
            await bot.start(config.token)
    except discord.LoginFailure:
        log.error("Discord rejected DISCORD_TOKEN: copy the token again from the Developer Portal (Bot > Reset Token).")
        return 1
    except discord.PrivilegedIntentsRequired:
        log.error(
            "Discord refused the connection: enable the Message Content Intent in the Developer Portal "
            "(your application > Bot > Privileged Gateway Intents), then start the bot again."
        )
        return 1
    except (ModelUnavailable, ModelMismatch, DatabaseUnavailable) as error:
        log.error("%s", error)
        return 1
    except (OSError, discord.GatewayNotFound, discord.ConnectionClosed) as error:
        # aiohttp's connection errors are OSErrors; a DNS failure or a firewall lands here
        log.error("Cannot reach Discord (%s): check the network connection and try again.", error or type(error).__name__)
        return 1
    finally:
        try:
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):
            pass
    return 0


async def cmd_bot(args: argparse.Namespace) -> int:
    """The `shoebox bot` sub-command."""
    from bot.cli import UserError, load_settings

    settings = load_settings(args)
    try:
        config = BotSettings.from_env(max_file_bytes=settings.ingest.max_file_bytes)
    except SettingsError as error:
        raise UserError(str(error)) from None
    if args.verbose == 0:
        logging.getLogger().setLevel(logging.INFO)  # a long-running service: say what it does
    return await run_bot(settings, config)


__all__ = [
    "BotSettings",
    "ShoeboxBot",
    "addresses_bot",
    "bot_intents",
    "cmd_bot",
    "make_agent",
    "own_role_id",
    "run_bot",
]
