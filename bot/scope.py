"""Which photos a person may be shown: the channels they can view AND read the history of.

The answer is computed from Discord's own permission model (`channel.permissions_for(member)`)
at the moment a question is asked, never cached: roles and overwrites change, and a stale scope
would show someone photos from a channel they have just been removed from. Both permissions are
needed because a member who can view a channel but not read its history cannot scroll back to old
photos in Discord either, and Shoebox must not become a way around that.

This module is pure: it reads discord.py objects that are already in memory and does no I/O, so
the rules are testable without Discord. Looking members up (an HTTP call in DMs) is the caller's
job.

Threads need care: an archived thread is not in discord.py's cache, yet photos posted in it are in
the index under the thread's id. The bot remembers each thread's parent when it indexes a photo
from it (`KnownThread`), so such photos stay visible to exactly the people who can read the parent
(and, for a private thread, who are in it or may manage threads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

import discord

from tools.search import Scope


@dataclass(frozen=True)
class KnownThread:
    """A thread the bot has indexed photos from, remembered with its parent channel."""

    thread_id: int
    parent_id: int
    guild_id: int
    private: bool = False
    owner_id: int | None = None


class _HasPermissions(Protocol):
    def permissions_for(self, obj: discord.Member, /) -> discord.Permissions: ...


def can_read_history(channel: _HasPermissions, member: discord.Member) -> bool:
    """True when the member can both see the channel and scroll back through it."""
    permissions = channel.permissions_for(member)
    return bool(permissions.view_channel and permissions.read_message_history)


def _thread_readable(
    parent: _HasPermissions | None,
    member: discord.Member,
    *,
    private: bool,
    owner_id: int | None,
    joined: bool,
) -> bool:
    """A thread inherits its parent's permissions; a private one also needs membership.

    Membership of a private thread is only known for threads in the cache; for the rest, the
    owner and members who may manage threads are the people certain to have access.
    """
    if parent is None:
        return False  # parent gone or unknown: nothing to check against, so nothing is shown
    permissions = parent.permissions_for(member)
    if not (permissions.view_channel and permissions.read_message_history):
        return False
    if private:
        return joined or owner_id == member.id or permissions.manage_threads
    return True


def readable_channel_ids(
    guild: discord.Guild, member: discord.Member, known_threads: Iterable[KnownThread] = ()
) -> set[int]:
    """Ids of every channel and thread in `guild` whose photos `member` may be shown."""
    readable: set[int] = set()
    for channel in guild.channels:
        if isinstance(channel, discord.CategoryChannel):
            continue  # categories hold no messages
        if can_read_history(channel, member):
            readable.add(channel.id)
    cached_threads: set[int] = set()
    for thread in guild.threads:
        cached_threads.add(thread.id)
        if _thread_readable(
            thread.parent,
            member,
            private=thread.is_private(),
            owner_id=thread.owner_id,
            joined=thread.get_member(member.id) is not None,
        ):
            readable.add(thread.id)
    for known in known_threads:
        if known.guild_id != guild.id or known.thread_id in cached_threads:
            continue
        parent = guild.get_channel(known.parent_id)
        if _thread_readable(parent, member, private=known.private, owner_id=known.owner_id, joined=False):
            readable.add(known.thread_id)
    return readable


def guild_scope(
    guild: discord.Guild, member: discord.Member, known_threads: Iterable[KnownThread] = ()
) -> Scope:
    """The scope of a question asked inside `guild`: that guild's channels the member can read.

    Limited to the one guild even when the member shares others with the bot: an answer posted
    in a channel is read by that channel's audience, which belongs to this guild.
    """
    return Scope.channels(readable_channel_ids(guild, member, known_threads), {guild.id})


def dm_scope(
    members: Iterable[discord.Member], known_threads: Mapping[int, Iterable[KnownThread]] | None = None
) -> Scope:
    """The scope of a question asked in a DM: the union over every guild the user shares with the bot.

    `members` are the user's Member objects, one per shared guild (each carries its guild and
    roles); `known_threads` maps a guild id to the threads remembered for it.
    """
    channel_ids: set[int] = set()
    guild_ids: set[int] = set()
    for member in members:
        threads = (known_threads or {}).get(member.guild.id, ())
        channel_ids |= readable_channel_ids(member.guild, member, threads)
        guild_ids.add(member.guild.id)
    return Scope.channels(channel_ids, guild_ids)


def nothing() -> Scope:
    """A scope that matches no photo (an asker whose membership cannot be established)."""
    return Scope.channels(set(), set())


__all__ = [
    "KnownThread",
    "can_read_history",
    "dm_scope",
    "guild_scope",
    "nothing",
    "readable_channel_ids",
]
