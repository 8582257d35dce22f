"""A fake Discord for driving the real bot through discord.py's own models and event parsing.

The bot under test is the real `ShoeboxBot` with its real cogs, a real `Library` on disk and the
real small CLIP model. What is fake is Discord itself, at the two places discord.py talks to it:

* the gateway: events are fed to discord.py's real `ConnectionState.parse_*` methods as the JSON
  payloads Discord sends (GUILD_CREATE with roles, channels and permission overwrites,
  MESSAGE_CREATE with the author's member object, MESSAGE_DELETE, INTERACTION_CREATE, ...), so
  discord.py builds the same `Guild`, `Member`, `Message` and `Interaction` objects it would in
  production, and dispatches to the cogs' listeners and the command tree the usual way;
* the REST API: `FakeDiscordHttp` replaces discord.py's `HTTPClient` with the handful of endpoints
  the bot uses (send, typing, reactions, fetch message/member/channel, history, CDN downloads)
  and fails loudly on any other call; interaction responses go through a fake webhook adapter.

The bot runs without the members intent, as in production: members are never cached, so a DM
question exercises the `fetch_member` path. Everything the bot sends is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import discord
import pytest
from discord.http import HTTPClient, Route
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

from bot.discord_app import INVITE_PERMISSIONS, BotSettings, ShoeboxBot
from bot.jobs import QueueSettings
from store.library import Library
from store.settings import Settings
from tests.conftest import scene_jpeg

DISCORD_EPOCH_MS = 1420070400000
_sequence = itertools.count(1)


def snowflake() -> int:
    """A fresh, increasing Discord id whose timestamp is now (like real ones)."""
    millis = int(time.time() * 1000) - DISCORD_EPOCH_MS
    return (millis << 22) | (next(_sequence) % (1 << 22))


class _Response:
    """What discord.py's HTTP exceptions need from a response."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


def not_found(what: str) -> discord.NotFound:
    return discord.NotFound(_Response(404, "Not Found"), {"code": 10008, "message": f"Unknown {what}"})  # type: ignore[arg-type]


def server_error() -> discord.DiscordServerError:
    return discord.DiscordServerError(_Response(500, "Internal Server Error"), {"message": "try again"})  # type: ignore[arg-type]


def invalid_form(reason: str) -> discord.HTTPException:
    return discord.HTTPException(_Response(400, "Bad Request"), {"code": 50035, "message": f"Invalid Form Body ({reason})"})  # type: ignore[arg-type]


def forbidden(what: str) -> discord.Forbidden:
    return discord.Forbidden(_Response(403, "Forbidden"), {"code": 50013, "message": f"Missing Permissions ({what})"})  # type: ignore[arg-type]


# Permissions a normal server gives @everyone, and what the bot's role grants (the invite's set).
EVERYONE = discord.Permissions(
    view_channel=True, send_messages=True, read_message_history=True, attach_files=True,
    embed_links=True, add_reactions=True, use_application_commands=True,
)
BOT_PERMISSIONS = INVITE_PERMISSIONS


@dataclass
class Sent:
    """One message the bot sent, through the REST API or as an interaction response."""

    channel_id: int
    content: str | None
    embeds: list[dict[str, Any]]
    files: list[tuple[str, bytes]]
    ephemeral: bool = False
    reference: int | None = None
    message_id: int | None = None
    kind: str = "message"  # message | interaction | followup | edit


@dataclass
class World:
    """The server-side state: what Discord knows and what the bot did."""

    application_id: int
    bot_user: dict[str, Any]
    users: dict[int, dict[str, Any]] = field(default_factory=dict)
    members: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # (guild, user) -> member
    channels: dict[int, dict[str, Any]] = field(default_factory=dict)
    messages: dict[int, dict[int, dict[str, Any]]] = field(default_factory=dict)  # channel -> id -> msg
    cdn: dict[str, bytes] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    reactions: list[tuple[int, int, str]] = field(default_factory=list)
    typing: list[int] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    cdn_failures: dict[str, int] = field(default_factory=dict)  # url -> how many times to fail first
    app_owner: int | None = None  # the user who owns the bot's application (None: nobody here)
    history_failures: dict[int, int] = field(default_factory=dict)  # channel -> history requests to fail
    history_resets: set[int] = field(default_factory=set)  # channels whose history requests lose the connection
    archived_page: int = 100  # archived threads per page of the listing (Discord's most)
    thread_members: dict[int, set[int]] = field(default_factory=dict)  # thread -> user ids in it
    thread_member_failures: int = 0  # membership lookups to answer with a server error
    archived_failures: set[int] = field(default_factory=set)  # channels whose archived threads cannot be listed


class FakeDiscordHttp(HTTPClient):
    """The REST endpoints Shoebox uses, answered from `World`. Anything else is a test failure."""

    def __init__(self, world: World, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.world = world
        self.state: Any = None  # set by the harness; used to dispatch the bot's own messages

    async def request(self, route: Route, **kwargs: Any) -> Any:  # pragma: no cover - a failing test
        raise AssertionError(f"unexpected Discord API call: {route.method} {route.path}")

    async def close(self) -> None:
        return None

    async def static_login(self, token: str) -> Any:  # pragma: no cover - never used by the harness
        raise AssertionError("the harness never logs in")

    async def get_from_cdn(self, url: str) -> bytes:
        self.world.calls.append(f"cdn {url}")
        remaining = self.world.cdn_failures.get(url, 0)
        if remaining:
            self.world.cdn_failures[url] = remaining - 1
            raise discord.HTTPException(_Response(503, "Service Unavailable"), "try again")  # type: ignore[arg-type]
        if url not in self.world.cdn:
            raise not_found("attachment")
        return self.world.cdn[url]

    async def send_typing(self, channel_id: int) -> None:
        self.world.typing.append(int(channel_id))

    async def add_reaction(self, channel_id: int, message_id: int, emoji: str) -> None:
        channel = self.world.channels.get(int(channel_id))
        if channel and channel.get("guild_id") and not self._bot_may(channel, "add_reactions"):
            raise forbidden("add reactions")
        self.world.reactions.append((int(channel_id), int(message_id), emoji))

    async def send_message(self, channel_id: int, *, params: Any) -> Any:
        payload = dict(params.payload or {})
        if params.files and not payload:
            for part in params.multipart or []:
                if part.get("name") == "payload_json":
                    payload = json.loads(part["value"])
        files = [(f.filename, _read(f)) for f in (params.files or [])]
        reference = (payload.get("message_reference") or {}).get("message_id")
        if reference and int(reference) not in self.world.messages.get(int(channel_id), {}):
            # A reply to a message deleted meanwhile: refused, unless the bot said to send anyway.
            if (payload.get("message_reference") or {}).get("fail_if_not_exists", True):
                raise invalid_form("message_reference: Unknown message")
            reference = None
        channel = self.world.channels.get(int(channel_id))
        if channel and channel.get("guild_id"):
            # Discord counts sending in a thread apart from sending in its channel.
            send = "send_messages_in_threads" if channel["type"] in (11, 12) else "send_messages"
            if not self._bot_may(channel, send):
                raise forbidden(send)
            if files and not self._bot_may(channel, "attach_files"):
                raise forbidden("attach files")
            if payload.get("embeds") and not self._bot_may(channel, "embed_links"):
                # Discord drops the embeds of a message that has anything else, without a word.
                if not payload.get("content") and not files:
                    raise forbidden("embed links")
                payload["embeds"] = []
        data = self.world_message(
            int(channel_id),
            self.world.bot_user,
            payload.get("content") or "",
            guild_id=channel.get("guild_id") if channel else None,
            embeds=payload.get("embeds") or [],
            attachments=[{"id": str(snowflake()), "filename": name, "size": len(body), "url": f"https://cdn.test/{name}",
                          "proxy_url": f"https://cdn.test/{name}"} for name, body in files],
            reference=int(reference) if reference else None,
        )
        self.world.sent.append(
            Sent(int(channel_id), payload.get("content"), payload.get("embeds") or [], files,
                 reference=int(reference) if reference else None, message_id=int(data["id"]))
        )
        # Discord echoes the bot's own message back over the gateway; the bot must ignore it.
        self.state.parse_message_create(data)
        return data

    def _bot_may(self, channel: dict[str, Any], permission: str) -> bool:
        """Whether the bot holds `permission` in a server channel, as the bot's cache computes it.

        Only where the bot can view the channel: many layouts hide channels from everyone but a
        role, the bot's own included, and still post there (the harness delivers every event).
        """
        guild = self.state._get_guild(int(channel["guild_id"]))
        cached = guild.get_channel_or_thread(int(channel["id"])) if guild else None
        if cached is None:
            return True
        permissions = cached.permissions_for(guild.me)
        return not permissions.view_channel or getattr(permissions, permission)

    def world_message(
        self,
        channel_id: int,
        author: dict[str, Any],
        content: str,
        *,
        guild_id: int | None,
        member: dict[str, Any] | None = None,
        embeds: list[dict[str, Any]] | None = None,
        attachments: list[dict[str, Any]] | None = None,
        reference: int | None = None,
        mentions: Sequence[dict[str, Any]] = (),
        message_id: int | None = None,
        kind: int | None = None,
        mention_roles: Sequence[str] = (),
    ) -> dict[str, Any]:
        message_id = message_id or snowflake()
        data: dict[str, Any] = {
            "id": str(message_id),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": datetime.fromtimestamp(
                ((message_id >> 22) + DISCORD_EPOCH_MS) / 1000, tz=timezone.utc
            ).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": list(mentions),
            "mention_roles": list(mention_roles),
            "attachments": attachments or [],
            "embeds": embeds or [],
            "pinned": False,
            "type": kind if kind is not None else 19 if reference else 0,
            "flags": 0,
        }
        if guild_id is not None:
            data["guild_id"] = str(guild_id)
            if member is not None:
                data["member"] = member
        if reference is not None:
            data["message_reference"] = {
                "message_id": str(reference), "channel_id": str(channel_id),
                **({"guild_id": str(guild_id)} if guild_id else {}),
            }
            referenced = self.world.messages.get(channel_id, {}).get(reference)
            # One level only: the message replied to comes without what *it* replied to.
            data["referenced_message"] = (
                {k: v for k, v in referenced.items() if k != "referenced_message"} if referenced else None
            )
        self.world.messages.setdefault(channel_id, {})[message_id] = data
        return data

    async def get_message(self, channel_id: int, message_id: int) -> Any:
        self.world.calls.append(f"get_message {message_id}")
        found = self.world.messages.get(int(channel_id), {}).get(int(message_id))
        if found is None:
            raise not_found("message")
        return found

    async def logs_from(
        self, channel_id: int, limit: int, before: int | None = None, after: int | None = None, around: int | None = None
    ) -> Any:
        self.world.calls.append(
            f"logs_from {channel_id} before={before} limit={limit}" + (f" after={after}" if after is not None else "")
        )
        if int(channel_id) in self.world.history_resets:
            # What Linux gives discord.py for a dropped connection, which it does not retry.
            raise ConnectionResetError(104, "Connection reset by peer")
        failing = self.world.history_failures.get(int(channel_id), 0)
        if failing:
            self.world.history_failures[int(channel_id)] = failing - 1
            raise discord.HTTPException(_Response(500, "Internal Server Error"), "history unavailable")  # type: ignore[arg-type]
        newest_first = sorted(self.world.messages.get(int(channel_id), {}).values(), key=lambda m: -int(m["id"]))
        if before is not None:
            newest_first = [m for m in newest_first if int(m["id"]) < int(before)]
        if after is not None:
            # Discord gives the `limit` messages right after `after`, newest first.
            return [m for m in newest_first if int(m["id"]) > int(after)][-limit:]
        return newest_first[:limit]

    def _archived(self, channel_id: int, kind: int) -> list[dict[str, Any]]:
        return [c for c in self.world.channels.values()
                if c.get("type") == kind and c.get("parent_id") == str(channel_id) and c["thread_metadata"]["archived"]]

    def _archived_page(self, threads: list[dict[str, Any]], limit: int) -> Any:
        page = min(limit, self.world.archived_page)
        return {"threads": threads[:page], "members": [], "has_more": len(threads) > page}

    def _by_archive_time(self, threads: list[dict[str, Any]], before: Any) -> list[dict[str, Any]]:
        """Most recently archived first, those archived before `before` (an ISO time) only."""
        archived_at = lambda c: datetime.fromisoformat(c["thread_metadata"]["archive_timestamp"])  # noqa: E731
        earlier = [c for c in threads if before is None or archived_at(c) < datetime.fromisoformat(str(before))]
        return sorted(earlier, key=archived_at, reverse=True)

    async def get_public_archived_threads(self, channel_id: int, before: Any = None, limit: int = 50) -> Any:
        self.world.calls.append(f"archived_threads {channel_id}")
        if int(channel_id) in self.world.archived_failures:
            raise server_error()
        return self._archived_page(self._by_archive_time(self._archived(channel_id, 11), before), limit)

    async def get_private_archived_threads(self, channel_id: int, before: Any = None, limit: int = 50) -> Any:
        """Every private archived thread: Discord wants Manage Threads for this listing."""
        self.world.calls.append(f"private_archived_threads {channel_id}")
        guild = self.state._get_guild(int(self.world.channels[int(channel_id)]["guild_id"]))
        channel = guild.get_channel(int(channel_id))
        if not channel.permissions_for(guild.me).manage_threads:
            raise forbidden("manage threads")
        return self._archived_page(self._by_archive_time(self._archived(channel_id, 12), before), limit)

    async def get_joined_private_archived_threads(self, channel_id: int, before: Any = None, limit: int = 50) -> Any:
        """The private archived threads the bot is in, by decreasing id (not archive time)."""
        self.world.calls.append(f"joined_private_archived_threads {channel_id}")
        bot_id = int(self.world.bot_user["id"])
        threads = sorted(
            (c for c in self._archived(channel_id, 12)
             if bot_id in self.world.thread_members.get(int(c["id"]), set())
             and (before is None or int(c["id"]) < int(before))),
            key=lambda c: int(c["id"]), reverse=True,
        )
        return self._archived_page(threads, limit)

    async def get_member(self, guild_id: int, member_id: int) -> Any:
        self.world.calls.append(f"get_member {guild_id} {member_id}")
        member = self.world.members.get((int(guild_id), int(member_id)))
        if member is None:
            raise not_found("member")
        return {**member, "user": self.world.users[int(member_id)]}

    async def application_info(self) -> Any:
        self.world.calls.append("application_info")
        owner = self.world.users.get(self.world.app_owner or 0) or {
            "id": str(snowflake()), "username": "someone-else", "discriminator": "0", "global_name": None, "avatar": None,
        }
        return {
            "id": str(self.world.application_id), "name": "Shoebox", "description": "", "icon": None,
            "bot_public": False, "bot_require_code_grant": False, "owner": owner, "team": None, "verify_key": "0" * 64,
        }

    async def get_thread_member(self, channel_id: int, user_id: int) -> Any:
        self.world.calls.append(f"thread_member {channel_id} {user_id}")
        if self.world.thread_member_failures > 0:
            self.world.thread_member_failures -= 1
            raise server_error()
        if int(user_id) not in self.world.thread_members.get(int(channel_id), set()):
            raise not_found("thread member")
        return {"id": str(channel_id), "user_id": str(user_id), "join_timestamp": "2026-01-01T00:00:00+00:00", "flags": 0}

    async def get_channel(self, channel_id: int) -> Any:
        self.world.calls.append(f"get_channel {channel_id}")
        channel = self.world.channels.get(int(channel_id))
        if channel is None:
            raise not_found("channel")
        return channel


def _read(file: discord.File) -> bytes:
    file.reset()
    return file.fp.read()


class FakeInteractionApi(AsyncWebhookAdapter):
    """Interaction callbacks, follow-ups and edits, recorded instead of sent."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.originals: dict[str, dict[str, Any]] = {}

    async def request(self, route: Route, session: Any, *, payload: dict[str, Any] | None = None,
                      multipart: list[dict[str, Any]] | None = None, files: Sequence[discord.File] | None = None,
                      params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        body = dict(payload or {})
        if not body and multipart:
            for part in multipart:
                if part.get("name") == "payload_json":
                    body = json.loads(part["value"])
        recorded_files = [(f.filename, _read(f)) for f in (files or [])]
        path = route.path
        token = route.webhook_token or ""
        if path.endswith("/callback"):
            kind = body.get("type")
            data = body.get("data") or {}
            if kind == 4:  # a message
                self._record(data, recorded_files, "interaction", token)
            elif kind == 5:  # deferred ("thinking")
                self.originals[token] = {"ephemeral": bool((data.get("flags") or 0) & 64)}
            return {"interaction": {"id": str(route.webhook_id), "type": 2}}
        if route.method == "PATCH" and path.endswith("/@original"):
            self._record(body, recorded_files, "edit", token)
            return self._message(body)
        if route.method == "POST":  # a follow-up
            self._record(body, recorded_files, "followup", token)
            return self._message(body)
        return self._message(body)

    def _record(self, body: dict[str, Any], files: list[tuple[str, bytes]], kind: str, token: str) -> None:
        ephemeral = bool((body.get("flags") or 0) & 64)
        if kind == "edit":
            ephemeral = self.originals.get(token, {}).get("ephemeral", True)
        elif kind == "interaction":
            self.originals[token] = {"ephemeral": ephemeral}
        self.world.sent.append(
            Sent(0, body.get("content"), body.get("embeds") or [], files, ephemeral=ephemeral, kind=kind)
        )

    def _message(self, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": str(snowflake()), "channel_id": str(next(iter(self.world.channels), 0)),
            "author": self.world.bot_user, "content": body.get("content") or "",
            "timestamp": datetime.now(timezone.utc).isoformat(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [],
            "embeds": body.get("embeds") or [], "pinned": False, "type": 0, "flags": body.get("flags") or 0,
        }


# ---- the guild layout ------------------------------------------------------------------------


@dataclass
class ChannelSpec:
    """A text channel and its permission overwrites: role or member name -> (allow, deny)."""

    name: str
    overwrites: dict[str, tuple[discord.Permissions, discord.Permissions]] = field(default_factory=dict)
    category: str | None = None


@dataclass
class Layout:
    """Roles (name -> permissions), channels, and members (name -> role names)."""

    roles: dict[str, discord.Permissions] = field(default_factory=dict)
    channels: list[ChannelSpec] = field(default_factory=lambda: [ChannelSpec("general")])
    members: dict[str, list[str]] = field(default_factory=dict)
    everyone: discord.Permissions = field(default_factory=lambda: discord.Permissions(EVERYONE.value))
    owner: str | None = None


def allow(**perms: bool) -> tuple[discord.Permissions, discord.Permissions]:
    return discord.Permissions(**perms), discord.Permissions.none()


def deny(**perms: bool) -> tuple[discord.Permissions, discord.Permissions]:
    return discord.Permissions.none(), discord.Permissions(**perms)


@dataclass(frozen=True)
class GuildView:
    """One of the harness's servers, by name: `Harness.use_guild` makes it the one acted in."""

    guild_id: int
    role_ids: dict[str, int]
    channel_ids: dict[str, int]
    user_ids: dict[str, int]


class Harness:
    """One guild (or several, see `add_guild`), its people and channels, and the bot running
    against them."""

    def __init__(self, bot: ShoeboxBot, world: World, http: FakeDiscordHttp, adapter: FakeInteractionApi) -> None:
        self.bot = bot
        self.world = world
        self.http = http
        self.adapter = adapter
        self.guild_id = 0
        self.role_ids: dict[str, int] = {}
        self.channel_ids: dict[str, int] = {}
        self.user_ids: dict[str, int] = {}
        self._token = None
        self._stopped = False

    # ---- start and stop -----------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        settings: Settings,
        library: Library,
        agent: Any,
        layout: Layout,
        *,
        reaction: str | None = "\N{CAMERA WITH FLASH}",
        queue: QueueSettings | None = None,
        run_worker: bool = True,
        world: "World | None" = None,
    ) -> "Harness":
        """A bot connected to a fake Discord: `world`, to restart against the same Discord (its
        messages and files), or a new one."""
        config = BotSettings(
            token="test", sync_commands=False, reaction=reaction, progress_interval=0.0,
            queue=queue or QueueSettings(batch_size=8, retry_delays=(0.0,), idle_poll=0.2,
                                         max_file_bytes=settings.ingest.max_file_bytes),
        )
        bot = ShoeboxBot(settings, config, library=library, agent=agent)
        loop = asyncio.get_running_loop()
        if world is None:
            app_id = snowflake()
            bot_user = {"id": str(app_id), "username": "Shoebox", "discriminator": "0", "global_name": None,
                        "avatar": None, "bot": True}
            world = World(application_id=app_id, bot_user=bot_user)
        app_id, bot_user = world.application_id, world.bot_user
        http = FakeDiscordHttp(world, loop)
        await bot.http.close()
        bot.http = http
        state = bot._connection
        state.http = http
        http.state = state
        state.user = discord.ClientUser(state=state, data=bot_user)  # type: ignore[arg-type]
        state.application_id = app_id
        adapter = FakeInteractionApi(world)
        harness = cls(bot, world, http, adapter)
        harness._token = async_context.set(adapter)
        await bot._async_setup_hook()  # what `async with bot` / login would do: binds the loop
        harness.build(layout)
        await bot.setup_hook()
        indexing = bot.get_cog("Indexing")
        if indexing is not None:
            # What connecting does: every channel is watched from its present newest message.
            await indexing.on_connect()  # type: ignore[attr-defined]
            await indexing.catch_up()  # type: ignore[attr-defined]
        if not run_worker and indexing is not None:
            await indexing.queue.stop()  # type: ignore[attr-defined]
        return harness

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.settle()
        await self.bot.close()
        if self._token is not None:
            try:
                async_context.reset(self._token)
            except ValueError:
                pass  # set in the test's context, stopped from the fixture's: nothing leaks either way

    # ---- building the guild -------------------------------------------------------------------

    def guild_view(self) -> GuildView:
        return GuildView(self.guild_id, dict(self.role_ids), dict(self.channel_ids), dict(self.user_ids))

    def use_guild(self, view: GuildView) -> None:
        """Act in `view`'s server from now on: names in `post`, `slash`, ... mean its members and channels."""
        self.guild_id = view.guild_id
        self.role_ids, self.channel_ids, self.user_ids = dict(view.role_ids), dict(view.channel_ids), dict(view.user_ids)

    def add_guild(self, layout: Layout, name: str) -> GuildView:
        """Another server the bot is in; the harness goes on acting in the current one."""
        here = self.guild_view()
        self.build(layout, name)
        there = self.guild_view()
        self.use_guild(here)
        return there

    def build(self, layout: Layout, name: str = "Test Server") -> None:
        guild_id = snowflake()
        self.guild_id = guild_id
        self.role_ids = {"@everyone": guild_id}
        roles = [_role(guild_id, "@everyone", layout.everyone, 0)]
        for position, (role_name, permissions) in enumerate(layout.roles.items(), start=1):
            role_id = snowflake()
            self.role_ids[role_name] = role_id
            roles.append(_role(role_id, role_name, permissions, position))
        bot_role = snowflake()
        roles.append(_role(bot_role, "Shoebox", BOT_PERMISSIONS, len(roles), bot_id=int(self.world.bot_user["id"])))
        self.role_ids["Shoebox"] = bot_role  # the bot's own role, for overwrites that let it in
        for member_name in layout.members:
            self.user_ids[member_name] = snowflake()
        bot_id = int(self.world.bot_user["id"])
        self.world.users[bot_id] = self.world.bot_user
        for member_name, role_names in layout.members.items():
            user_id = self.user_ids[member_name]
            self.world.users[user_id] = {"id": str(user_id), "username": member_name, "discriminator": "0",
                                         "global_name": member_name.title(), "avatar": None}
            self.world.members[(guild_id, user_id)] = _member([self.role_ids[r] for r in role_names])
        self.world.members[(guild_id, bot_id)] = _member([bot_role])
        channels = []
        categories = {spec.category for spec in layout.channels if spec.category}
        category_ids = {}
        for position, category in enumerate(sorted(categories)):
            category_ids[category] = snowflake()
            channels.append({"id": str(category_ids[category]), "type": 4, "name": category, "position": position,
                             "permission_overwrites": [], "guild_id": str(guild_id)})
        for position, spec in enumerate(layout.channels):
            channel_id = snowflake()
            self.channel_ids[spec.name] = channel_id
            overwrites = []
            for target, (allowed, denied) in spec.overwrites.items():
                is_role = target in self.role_ids
                overwrites.append({
                    "id": str(self.role_ids[target] if is_role else self.user_ids[target]),
                    "type": 0 if is_role else 1, "allow": str(allowed.value), "deny": str(denied.value),
                })
            channels.append({
                "id": str(channel_id), "type": 0, "name": spec.name, "position": position, "guild_id": str(guild_id),
                "permission_overwrites": overwrites, "nsfw": False, "topic": None, "last_message_id": None,
                "rate_limit_per_user": 0,
                "parent_id": str(category_ids[spec.category]) if spec.category else None,
            })
        for channel in channels:
            self.world.channels[int(channel["id"])] = channel
        owner = self.user_ids[layout.owner] if layout.owner else snowflake()
        payload = {
            "id": str(guild_id), "name": name, "icon": None, "splash": None, "discovery_splash": None,
            "owner_id": str(owner), "afk_channel_id": None, "afk_timeout": 300, "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "roles": roles, "emojis": [],
            "stickers": [], "features": [], "mfa_level": 0, "application_id": None, "system_channel_id": None,
            "system_channel_flags": 0, "rules_channel_id": None, "vanity_url_code": None, "description": None,
            "banner": None, "premium_tier": 0, "premium_subscription_count": 0, "preferred_locale": "en-US",
            "public_updates_channel_id": None, "nsfw_level": 0, "premium_progress_bar_enabled": False,
            "member_count": len(layout.members) + 1, "large": False, "joined_at": datetime.now(timezone.utc).isoformat(),
            "channels": channels, "threads": [], "voice_states": [], "presences": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [],
            "members": [{**self.world.members[(guild_id, bot_id)], "user": self.world.bot_user}],
        }
        self.bot._connection.parse_guild_create(payload)  # type: ignore[arg-type]

    # ---- looking things up ----------------------------------------------------------------------

    @property
    def guild(self) -> discord.Guild:
        guild = self.bot.get_guild(self.guild_id)
        assert guild is not None
        return guild

    def channel(self, name: str) -> discord.TextChannel:
        channel = self.guild.get_channel(self.channel_ids[name])
        assert isinstance(channel, discord.TextChannel)
        return channel

    def member(self, name: str) -> discord.Member:
        """A Member model as discord.py builds it from a payload (never from a cache)."""
        user_id = self.user_ids[name]
        data = {**self.world.members[(self.guild_id, user_id)], "user": self.world.users[user_id]}
        return discord.Member(data=data, guild=self.guild, state=self.bot._connection)  # type: ignore[arg-type]

    def permissions(self, member: str, channel: str) -> discord.Permissions:
        return self.channel(channel).permissions_for(self.member(member))

    # ---- events in ------------------------------------------------------------------------------

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until every event handler and command the bot started has finished."""
        deadline = time.monotonic() + timeout
        current = asyncio.current_task()
        while True:
            pending = [
                t for t in asyncio.all_tasks()
                if t is not current and not t.done()
                and (t.get_name().startswith("discord.py: ") or t.get_name() == "CommandTree-invoker")
            ]
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"handlers still running: {[t.get_name() for t in pending]}")
            await asyncio.wait(pending, timeout=remaining)

    async def drain(self) -> None:
        """Let the indexing queue finish everything due, then let reactions go out."""
        await self.settle()
        indexing = self.bot.get_cog("Indexing")
        assert indexing is not None
        await indexing.queue.drain()  # type: ignore[attr-defined]
        for _ in range(5):
            await asyncio.sleep(0)

    def upload(self, filename: str, data: bytes, size: int | None = None) -> dict[str, Any]:
        """An attachment payload whose URL the fake CDN serves."""
        attachment_id = snowflake()
        url = f"https://cdn.discordapp.test/attachments/{attachment_id}/{filename}?ex=1"
        self.world.cdn[url] = data
        return {"id": str(attachment_id), "filename": filename, "size": len(data) if size is None else size,
                "url": url, "proxy_url": url}

    async def post(
        self,
        channel: str | int,
        author: str,
        content: str = "",
        files: Sequence[tuple[str, bytes]] = (),
        *,
        mention_bot: bool = False,
        reply_to: int | None = None,
        dm: bool = False,
        declared_sizes: Sequence[int] = (),
        kind: int | None = None,
    ) -> discord.Message:
        """A member posts a message (optionally with files, a mention of the bot, as a reply, or in a DM).
        `declared_sizes` overrides the sizes Discord reports for the first files; `kind` makes it
        a system message of that type, sent on the member's behalf."""
        user_id = self.user_ids[author]
        user = self.world.users[user_id]
        if dm:
            channel_id = self._dm_channel(user_id)
            guild_id = None
            member = None
        else:
            channel_id = self.channel_ids[channel] if isinstance(channel, str) else int(channel)
            guild_id = self.guild_id
            member = dict(self.world.members[(self.guild_id, user_id)])
        if mention_bot:
            content = f"<@{self.world.bot_user['id']}> {content}".strip()
        # Discord lists the users a message mentions beside it (the ones it knows).
        mentions = [self.world.users[int(user_id)] for user_id in dict.fromkeys(re.findall(r"<@!?([0-9]+)>", content))
                    if int(user_id) in self.world.users]
        roles = list(dict.fromkeys(re.findall(r"<@&([0-9]+)>", content)))
        data = self.http.world_message(
            channel_id, user, content, guild_id=guild_id, member=member, mention_roles=roles,
            attachments=[self.upload(name, body, size) for (name, body), size
                         in zip(files, [*declared_sizes, *[None] * len(files)])],
            reference=reply_to, mentions=mentions, kind=kind,
        )
        self.bot._connection.parse_message_create(data)  # type: ignore[arg-type]
        message = self.bot._connection._get_message(int(data["id"]))  # before the bot may delete it
        assert message is not None
        await self.settle()
        return message

    def post_while_away(
        self, channel: str, author: str, content: str = "", files: Sequence[tuple[str, bytes]] = (),
        *, opening: bool = False,
    ) -> int:
        """A member posts while the bot is not connected: Discord keeps the message, the bot gets
        no event, and the channel's last message id is what the next connection reports.
        `opening` makes it a thread's opening message, as in a forum: it has the thread's id."""
        user_id = self.user_ids[author]
        channel_id = self.channel_ids[channel]
        data = self.http.world_message(
            channel_id, self.world.users[user_id], content, guild_id=self.guild_id,
            member=dict(self.world.members[(self.guild_id, user_id)]),
            attachments=[self.upload(name, body) for name, body in files],
            message_id=channel_id if opening else None,
        )
        self.world.channels[channel_id]["last_message_id"] = data["id"]
        cached = self.bot.get_channel(channel_id)  # an archived thread is not in the cache
        if cached is not None:
            cached.last_message_id = int(data["id"])  # type: ignore[union-attr]
        return int(data["id"])

    def _dm_channel(self, user_id: int) -> int:
        for channel_id, channel in self.world.channels.items():
            if channel.get("type") == 1 and channel["recipients"][0]["id"] == str(user_id):
                return channel_id
        channel_id = snowflake()
        channel = {"id": str(channel_id), "type": 1, "recipients": [self.world.users[user_id]], "last_message_id": None}
        self.world.channels[channel_id] = channel
        self.bot._connection._add_private_channel(  # type: ignore[attr-defined]
            discord.DMChannel(me=self.bot.user, state=self.bot._connection, data=channel)  # type: ignore[arg-type]
        )
        return channel_id

    async def delete_message(self, message: discord.Message) -> None:
        self.world.messages.get(message.channel.id, {}).pop(message.id, None)
        self.bot._connection.parse_message_delete(  # type: ignore[arg-type]
            {"id": str(message.id), "channel_id": str(message.channel.id), "guild_id": str(self.guild_id)}
        )
        await self.settle()

    async def bulk_delete(self, channel: str, message_ids: Sequence[int]) -> None:
        for message_id in message_ids:
            self.world.messages.get(self.channel_ids[channel], {}).pop(message_id, None)
        self.bot._connection.parse_message_delete_bulk(  # type: ignore[arg-type]
            {"ids": [str(i) for i in message_ids], "channel_id": str(self.channel_ids[channel]),
             "guild_id": str(self.guild_id)}
        )
        await self.settle()

    async def edit_attachments(self, message: discord.Message, keep: Sequence[int]) -> None:
        """The author removes some attachments from a message (a MESSAGE_UPDATE with the rest)."""
        data = dict(self.world.messages[message.channel.id][message.id])
        data["attachments"] = [a for a in data["attachments"] if int(a["id"]) in set(keep)]
        data["edited_timestamp"] = datetime.now(timezone.utc).isoformat()
        self.world.messages[message.channel.id][message.id] = data
        self.bot._connection.parse_message_update(data)  # type: ignore[arg-type]
        await self.settle()

    async def edit_text(self, message: discord.Message, content: str) -> None:
        """The author rewrites a message's words (a MESSAGE_UPDATE with the new content)."""
        data = dict(self.world.messages[message.channel.id][message.id])
        data["content"] = content
        data["edited_timestamp"] = datetime.now(timezone.utc).isoformat()
        self.world.messages[message.channel.id][message.id] = data
        self.bot._connection.parse_message_update(data)  # type: ignore[arg-type]
        await self.settle()

    async def create_channel(self, name: str, *, while_away: bool = False) -> int:
        """A text channel everyone can read appears. Live, the bot gets CHANNEL_CREATE; while it
        is away it gets no event, and the next connection's server data lists the channel."""
        channel_id = snowflake()
        channel = {
            "id": str(channel_id), "type": 0, "name": name, "position": len(self.channel_ids),
            "guild_id": str(self.guild_id), "permission_overwrites": [], "nsfw": False, "topic": None,
            "last_message_id": None, "rate_limit_per_user": 0, "parent_id": None,
        }
        self.world.channels[channel_id] = channel
        self.channel_ids[name] = channel_id
        if while_away:
            self.guild._add_channel(discord.TextChannel(state=self.bot._connection, guild=self.guild, data=channel))  # type: ignore[arg-type]
        else:
            self.bot._connection.parse_channel_create(channel)  # type: ignore[arg-type]
            await self.settle()
        return channel_id

    async def delete_channel(self, name: str, *, while_away: bool = False) -> None:
        """A channel goes: live, the bot gets CHANNEL_DELETE (THREAD_DELETE for a thread); while
        it is away it gets no event, and the next connection's server data just lacks the channel."""
        channel = self.world.channels.pop(self.channel_ids[name])
        if channel["type"] in (11, 12):
            assert not while_away, "a thread deleted while away: drop it from world.channels"
            self.bot._connection.parse_thread_delete(channel)  # type: ignore[arg-type]
        elif while_away:
            self.guild._remove_channel(self.guild.get_channel(int(channel["id"])))  # type: ignore[arg-type]
            return
        else:
            self.bot._connection.parse_channel_delete(channel)  # type: ignore[arg-type]
        await self.settle()

    async def create_thread(self, parent: str, name: str, **options: Any) -> dict[str, Any]:
        """A member starts a thread while the bot is connected: it gets THREAD_CREATE."""
        thread = self.add_thread(parent, name, **options)
        self.bot._connection.parse_thread_create({**thread, "newly_created": True})  # type: ignore[arg-type]
        await self.settle()
        return thread

    def add_thread(
        self, parent: str, name: str, *, owner: str = "ann", private: bool = False,
        archived_at: str | None = None, cached: bool = False,
    ) -> dict[str, Any]:
        """A thread of `parent` in Discord's records, archived at `archived_at` or open; `cached`
        puts it in the bot's cache too (as the server data of a connection does for open threads).
        A private thread has its owner as its only member."""
        thread_id = snowflake()
        thread = {
            "id": str(thread_id), "name": name, "type": 12 if private else 11, "guild_id": str(self.guild_id),
            "parent_id": str(self.channel_ids[parent]), "owner_id": str(self.user_ids[owner]),
            "member_count": 2, "message_count": 0, "rate_limit_per_user": 0, "flags": 0, "last_message_id": None,
            "thread_metadata": {"archived": archived_at is not None, "auto_archive_duration": 1440,
                                "archive_timestamp": archived_at or datetime.now(timezone.utc).isoformat(),
                                "locked": False},
        }
        self.world.channels[thread_id] = thread
        self.channel_ids[name] = thread_id
        if private:
            self.world.thread_members[thread_id] = {self.user_ids[owner]}
        if cached:
            self.guild._add_thread(discord.Thread(guild=self.guild, state=self.bot._connection, data=thread))  # type: ignore[arg-type]
        return thread

    async def remove_bot_from_guild(self) -> None:
        self.bot._connection.parse_guild_delete({"id": str(self.guild_id)})  # type: ignore[arg-type]
        await self.settle()

    # ---- interactions -------------------------------------------------------------------------

    async def slash(
        self,
        member: str,
        channel: str,
        name: str,
        options: Sequence[dict[str, Any]] = (),
        *,
        resolved: dict[str, Any] | None = None,
    ) -> list[Sent]:
        """A member runs a slash command (`name` may be "group sub"); returns what the bot answered."""
        return await self._interact(member, channel, _slash_data(name, options, resolved))

    async def slash_together(self, calls: Sequence[tuple[str, str, str]]) -> list[Sent]:
        """Several members run slash commands (member, channel, name) at the same moment, each
        arriving before the bot has answered any; returns everything the bot answered."""
        before = len(self.world.sent)
        for member, channel, name in calls:
            self.bot._connection.parse_interaction_create(  # type: ignore[arg-type]
                self._interaction_payload(member, channel, _slash_data(name, (), None))
            )
        await self.settle()
        return self.world.sent[before:]

    async def message_command(self, member: str, channel: str, name: str, message: discord.Message) -> list[Sent]:
        """A member runs a message context-menu command on `message`."""
        raw = self.world.messages[message.channel.id][message.id]
        data = {"id": str(snowflake()), "name": name, "type": 3, "target_id": str(message.id),
                "resolved": {"messages": {str(message.id): raw}}}
        return await self._interact(member, channel, data)

    async def _interact(self, member_name: str, channel_name: str, data: dict[str, Any]) -> list[Sent]:
        payload = self._interaction_payload(member_name, channel_name, data)
        before = len(self.world.sent)
        self.bot._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        await self.settle()
        return self.world.sent[before:]

    def _interaction_payload(self, member_name: str, channel_name: str, data: dict[str, Any]) -> dict[str, Any]:
        user_id = self.user_ids[member_name]
        channel = self.guild.get_channel_or_thread(self.channel_ids[channel_name])
        assert channel is not None, f"{channel_name} is not in the bot's cache"
        member = self.member(member_name)
        permissions = channel.permissions_for(member)
        member_payload = {**self.world.members[(self.guild_id, user_id)], "user": self.world.users[user_id],
                          "permissions": str(permissions.value)}
        payload = {
            "id": str(snowflake()), "application_id": str(self.world.application_id), "type": 2,
            "token": f"token-{snowflake()}", "version": 1, "guild_id": str(self.guild_id),
            "channel_id": str(channel.id), "channel": self.world.channels[channel.id],
            "member": member_payload, "app_permissions": str(BOT_PERMISSIONS.value), "locale": "en-US",
            "guild_locale": "en-US", "entitlements": [], "authorizing_integration_owners": {"0": str(self.guild_id)},
            "context": 0, "attachment_size_limit": 10 * 1024 * 1024, "data": data,
        }
        return payload

    # ---- what the bot sent -------------------------------------------------------------------

    def sent_since(self, index: int) -> list[Sent]:
        return self.world.sent[index:]


def _slash_data(name: str, options: Sequence[dict[str, Any]], resolved: dict[str, Any] | None) -> dict[str, Any]:
    """An application command's `data` (`name` may be "group sub")."""
    parts = name.split()
    if len(parts) == 2:
        options = [{"name": parts[1], "type": 1, "options": list(options)}]
    data: dict[str, Any] = {"id": str(snowflake()), "name": parts[0], "type": 1, "options": list(options)}
    if resolved:
        data["resolved"] = resolved
    return data


def _role(role_id: int, name: str, permissions: discord.Permissions, position: int, bot_id: int | None = None) -> dict[str, Any]:
    """A role; with `bot_id`, the one Discord manages for that bot (tagged with its id)."""
    data: dict[str, Any] = {
        "id": str(role_id), "name": name, "color": 0, "colors": {"primary_color": 0}, "hoist": False,
        "position": position, "permissions": str(permissions.value), "managed": bot_id is not None,
        "mentionable": False, "flags": 0,
    }
    if bot_id is not None:
        data["tags"] = {"bot_id": str(bot_id)}
    return data


def _member(role_ids: Sequence[int]) -> dict[str, Any]:
    return {"roles": [str(r) for r in role_ids], "joined_at": datetime.now(timezone.utc).isoformat(),
            "deaf": False, "mute": False, "flags": 0, "nick": None, "avatar": None, "premium_since": None,
            "pending": False}


# ---- fixtures and picture makers ------------------------------------------------------------------


CHANNEL_MENTION = re.compile(r"<#(\d+)>")


def shown_channels(harness: Harness, sent: list[Sent]) -> set[str]:
    """The channels of the photos an answer showed, read off their cards."""
    names = {cid: name for name, cid in harness.channel_ids.items()}
    channels = set()
    for message in sent:
        for embed in message.embeds:
            for embed_field in embed.get("fields", []):
                if embed_field["name"] == "Channel":
                    match = CHANNEL_MENTION.fullmatch(embed_field["value"])
                    assert match, embed_field
                    channels.add(names[int(match.group(1))])
    return channels


def offline_agent(library: Library) -> Any:
    from bot.agent import Agent
    from bot.llm import AgentSettings

    return Agent(library, AgentSettings(api_key=None), None)


StartBot = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_bot(settings: Settings, library: Library) -> AsyncIterator[StartBot]:
    """Start the bot on a layout (offline agent unless one is given); stopped after the test."""
    running: list[Harness] = []

    async def start(layout: Layout, agent: Any = None, **options: Any) -> Harness:
        harness = await Harness.start(settings, library, agent or offline_agent(library), layout, **options)
        running.append(harness)
        return harness

    yield start
    for harness in running:
        await harness.stop()


__all__ = [
    "BOT_PERMISSIONS",
    "ChannelSpec",
    "EVERYONE",
    "Harness",
    "Layout",
    "Sent",
    "World",
    "allow",
    "deny",
    "offline_agent",
    "scene_jpeg",
    "snowflake",
    "start_bot",
]
