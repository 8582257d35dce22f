"""Which photos a person may be shown: the channels they can view AND read the history of.

The answer is computed from Discord's own permission model (`channel.permissions_for(member)`)
at the moment a question is asked, never cached: roles and overwrites change, and a stale scope
would show someone photos from a channel they have just been removed from. Both permissions are
needed because a member who can view a channel but not read its history cannot scroll back to old
photos in Discord either, and Shoebox must not become a way around that.

This module is pure: it reads discord.py objects that are already in memory and does no I/O, so
the rules are testable without Discord. Looking members up (an HTTP call in DMs), and asking
Discord whether the owner of a private thread is still in it, are the caller's job
(`bot/access.py`).

Threads need care: an archived thread is not in discord.py's cache, yet photos posted in it are in
the index under the thread's id. The bot remembers each thread's parent when it indexes a photo
from it (`KnownThread`), so such photos stay visible to exactly the people who can read the parent
(and, for a private thread, to those who may manage threads, to its owner while Discord
confirms they are still in it, and to whoever asks from inside it: `private_thread_asked_in`).

An answer posted in a server channel is seen by everyone who can view that channel, not only by
the asker (Read Message History only governs scrolling back; new messages reach every viewer), so
such an answer is further limited to channels "at least as visible" as the one it is posted in
(`audience_channel_ids`): a photo is only shown where everyone who will see the answer could
already read the photo's channel. That holds for the answer's own channel too: where some may view
it without reading its history, its old photos are held back like any other channel's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Mapping, Protocol, cast

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


_Access = Literal["no", "yes", "as owner"]


def _thread_access(
    parent: _HasPermissions | None,
    member: discord.Member,
    *,
    private: bool,
    owner_id: int | None,
    joined: bool,
) -> _Access:
    """A thread inherits its parent's permissions; a private one also needs membership.

    Membership of a private thread is only known for threads in the cache, and without the
    members intent only the bot's own; so its owner stands in for its members, with those who may
    manage threads. But a moderator can remove even the owner, and no cache says so: "as owner"
    is access the caller must confirm with Discord (`owner_only_thread_ids`).
    """
    if parent is None:
        return "no"  # parent gone or unknown: nothing to check against, so nothing is shown
    permissions = parent.permissions_for(member)
    if not (permissions.view_channel and permissions.read_message_history):
        return "no"
    if not private or joined or permissions.manage_threads:
        return "yes"
    return "as owner" if owner_id == member.id else "no"


def _thread_accesses(
    guild: discord.Guild, member: discord.Member, known_threads: Iterable[KnownThread]
) -> Iterator[tuple[int, _Access]]:
    """(thread id, access) for the guild's cached threads, then for the remembered ones out of
    the cache (archived threads are not in it), judged by the parent remembered for them."""
    cached_threads: set[int] = set()
    for thread in guild.threads:
        cached_threads.add(thread.id)
        yield thread.id, _thread_access(
            thread.parent,
            member,
            private=thread.is_private(),
            owner_id=thread.owner_id,
            joined=any(joined.id == member.id for joined in thread.members),
        )
    for known in known_threads:
        if known.guild_id != guild.id or known.thread_id in cached_threads:
            continue
        parent = guild.get_channel(known.parent_id)
        yield known.thread_id, _thread_access(
            parent, member, private=known.private, owner_id=known.owner_id, joined=False
        )


def readable_channel_ids(
    guild: discord.Guild, member: discord.Member, known_threads: Iterable[KnownThread] = ()
) -> set[int]:
    """Ids of every channel and thread in `guild` whose photos `member` may be shown, counting the
    private threads they own (see `owner_only_thread_ids` for those)."""
    readable: set[int] = set()
    for channel in guild.channels:
        if isinstance(channel, discord.CategoryChannel):
            continue  # categories hold no messages
        if can_read_history(channel, member):
            readable.add(channel.id)
    readable.update(thread_id for thread_id, access in _thread_accesses(guild, member, known_threads) if access != "no")
    return readable


def owner_only_thread_ids(
    guild: discord.Guild, member: discord.Member, known_threads: Iterable[KnownThread] = ()
) -> set[int]:
    """The private threads among `readable_channel_ids` that `member` reads only as their owner,
    as far as the cache can tell: the ones to confirm with Discord before showing their photos."""
    return {thread_id for thread_id, access in _thread_accesses(guild, member, known_threads) if access == "as owner"}


def private_thread_asked_in(
    guild: discord.Guild, member: discord.Member, channel: discord.abc.Snowflake | None
) -> set[int]:
    """The private thread a question was asked in, when it was one: posting in a private thread
    or using a command there takes being in it (or managing threads), which is the membership
    the cache cannot otherwise tell without the members intent. Empty for anywhere else."""
    thread = guild.get_thread(channel.id) if channel is not None else None
    if thread is None or not thread.is_private() or thread.parent is None or not can_read_history(thread, member):
        return set()
    return {thread.id}


_READ_BITS = discord.Permissions(view_channel=True, read_message_history=True).value
# The only base permissions that decide whether someone reads a channel: the two above, and
# Administrator, which bypasses every overwrite.
_DECIDING_BITS = _READ_BITS | discord.Permissions(administrator=True).value

_Channel = discord.abc.GuildChannel


def _reads(permissions: discord.Permissions) -> bool:
    """May scroll through the channel: what it takes to be shown its photos."""
    return bool(permissions.view_channel and permissions.read_message_history)


def _sees(permissions: discord.Permissions) -> bool:
    """Sees what is posted in the channel from now on: what it takes to read a new answer there."""
    return bool(permissions.view_channel)


def _is_role_target(target: discord.abc.Snowflake) -> bool:
    """An overwrite's target is a role (cached, or a deleted one discord.py could not resolve)."""
    return isinstance(target, discord.Role) or getattr(target, "type", None) is discord.Role


def _answer_parent(
    guild: discord.Guild, answer_channel: discord.abc.Snowflake, threads: Mapping[int, KnownThread]
) -> _Channel | None:
    """The cached channel whose permissions decide who reads an answer posted in `answer_channel`.

    A thread is judged by its parent: everyone who can read a thread can read its parent, so the
    parent's audience contains the thread's (a private thread's is smaller still), which only
    makes the check stricter. Only the guild's cache is trusted: a channel built from an
    interaction payload may lack its overwrites and would look more public than it is.
    """
    parent_id: int | None
    thread = guild.get_thread(answer_channel.id)
    if thread is not None:
        parent_id = thread.parent_id
    elif isinstance(answer_channel, discord.Thread):
        parent_id = answer_channel.parent_id
    elif answer_channel.id in threads:
        parent_id = threads[answer_channel.id].parent_id
    else:
        parent_id = answer_channel.id
    channel = guild.get_channel(parent_id)
    if channel is None or isinstance(channel, discord.CategoryChannel):
        return None
    return channel


def _photo_parent(guild: discord.Guild, channel_id: int, threads: Mapping[int, KnownThread]) -> _Channel | None:
    """The channel whose readers are exactly the readers of `channel_id`, or None.

    A public thread has its parent's readers. A private thread has fewer (its members and those
    who may manage threads), which cannot be compared role by role, so it gets None: its photos
    are only shown in the private thread itself.
    """
    parent_id: int
    thread = guild.get_thread(channel_id)
    if thread is not None:
        if thread.is_private():
            return None
        parent_id = thread.parent_id
    elif channel_id in threads:
        if threads[channel_id].private:
            return None
        parent_id = threads[channel_id].parent_id
    else:
        parent_id = channel_id
    channel = guild.get_channel(parent_id)
    if channel is None or isinstance(channel, discord.CategoryChannel):
        return None
    return channel


def _member_overwrites(
    channel: _Channel, bits: Callable[[discord.PermissionOverwrite], int]
) -> list[discord.abc.Snowflake]:
    """Targets of the member-specific overwrites of `channel` for which `bits(overwrite)` touches reading."""
    return [
        target
        for target, overwrite in channel.overwrites.items()
        if not _is_role_target(target) and bits(overwrite) & _READ_BITS
    ]


def _grants(overwrite: discord.PermissionOverwrite) -> int:
    return overwrite.pair()[0].value


def _denies(overwrite: discord.PermissionOverwrite) -> int:
    return overwrite.pair()[1].value


class _RoleHolder:
    """Someone holding exactly these roles (and @everyone), with no overwrite of their own.

    `GuildChannel.permissions_for` takes a Member or a single Role; this stands in for a member,
    so that discord.py combines several roles' permissions and overwrites exactly as it does for
    a real one. No member has id 0: it is never the owner nor the target of a member overwrite.
    """

    id = 0

    def __init__(self, role_ids: Iterable[int]) -> None:
        self._roles = discord.utils.SnowflakeList(sorted(set(role_ids)), is_sorted=True)

    def is_timed_out(self) -> bool:
        return False


def _at_least_as_visible(
    answer: _Channel, photo: _Channel, members: Mapping[int, discord.Member | None]
) -> bool:
    """Can everyone who sees `answer` read `photo`? Conservative: unsure means no.

    `photo` may be `answer` itself: viewing a channel does not mean reading its history, and an
    answer there must not scroll it back for those who may only view it.
    """
    guild = answer.guild
    answer_overwrites = answer.overwrites
    photo_overwrites = photo.overwrites
    with_overwrites = {target.id for target in (*answer_overwrites, *photo_overwrites) if _is_role_target(target)}

    # 1. Roles, one at a time on top of @everyone. Roles with no overwrite on either channel only
    #    differ by their base permissions, so one role per distinct set of deciding bits is enough.
    representatives: list[discord.Role] = []
    seen: set[int] = set()
    for role in guild.roles:
        if not role.is_default() and role.id not in with_overwrites:
            deciding = role.permissions.value & _DECIDING_BITS
            if deciding in seen:
                continue
            seen.add(deciding)
        representatives.append(role)
        if _sees(answer.permissions_for(role)) and not _reads(photo.permissions_for(role)):
            return False

    # 2. A role denied the photo's channel shuts out whoever holds it, whatever let them into the
    #    answer channel: so each such role is also paired with every other role.
    denied = [
        target
        for target, overwrite in photo_overwrites.items()
        if isinstance(target, discord.Role) and not target.is_default() and _denies(overwrite) & _READ_BITS
    ]
    for role in denied:
        for other in representatives:
            if other.is_default() or other.id == role.id:
                continue
            holder = cast(discord.Member, _RoleHolder((role.id, other.id)))
            if _sees(answer.permissions_for(holder)) and not _reads(photo.permissions_for(holder)):
                return False

    # 3. Members with their own overwrites: those let into the answer channel, and those shut out of
    #    the photo's channel, are checked exactly, as the members they are.
    for target in (*_member_overwrites(answer, _grants), *_member_overwrites(photo, _denies)):
        member: discord.Member | None
        if target.id in members:
            member = members[target.id]
            if member is None:
                continue  # known to have left the server: reads neither channel
        elif isinstance(target, discord.Member):
            member = target
        else:
            member = guild.get_member(target.id)
            if member is None:
                return False  # an unknown member might read the answer but not the photo
        if _sees(answer.permissions_for(member)) and not can_read_history(photo, member):
            return False
    return True


def audience_channel_ids(
    guild: discord.Guild,
    answer_channel: discord.abc.Snowflake,
    candidates: Iterable[int],
    known_threads: Iterable[KnownThread] = (),
    members: Mapping[int, discord.Member | None] | None = None,
) -> set[int]:
    """The `candidates` whose photos may be shown in an answer everyone in `answer_channel` sees.

    Why: the asker's scope says what the asker may see, but an answer posted in a server channel
    is read by that channel's whole audience. A staff member asking in #general must not surface
    #staff photos there. So a candidate channel C qualifies only if C is "at least as visible":
    every member who can view the answer channel can also view and read the history of C. Viewing
    is enough to be in the audience: without Read Message History a member cannot scroll back,
    but still sees every message posted while they look, the answer included. The answer channel
    (and its threads) is no exception: where some may view it but not read its history, an answer
    there must not show them its old photos. Without the members intent the
    audience cannot be listed, so this is decided conservatively from what is known:

    * roles: for @everyone alone and for every role R of the guild, a member holding only
      @everyone + R who can view the answer channel must be able to read C (discord.py's own
      permission computation for a role, with both channels' overwrites for @everyone and R;
      an Administrator role reads everything, so it never holds a channel back). A role D whose
      overwrite on C denies View Channel or Read Message History is also checked in pairs, D + R
      for every other role R, since D shuts its holders out of C whichever role let them into
      the answer channel;
    * members: everyone with a member-specific overwrite granting View Channel or Read Message
      History on the answer channel, or denying either on C, must, if they can view the answer
      channel, be able to read C. They are taken from `members` (id -> Member, or None for
      someone known to have left the server) or the guild's cache; if one cannot be found, C does
      not qualify.

    Real members hold several roles at once, and checking every single role alone (plus the
    pairs above) is an approximation: it can only be wrong where a combination of roles, and no
    single one of them, lets a member view the answer channel while keeping them out of C. That is rare, and the alternative, every
    combination of roles, is exponential.

    Threads are judged by their parent, as in `readable_channel_ids`: an answer in a thread by the
    parent's audience (a superset), a public thread's photos by the parent's readers. A private
    thread's photos are only shown in that thread, and there only if everyone who views its parent
    reads the parent's history (a thread's history is read through its parent's permission).
    Candidates that cannot be resolved, and all of them when the answer channel cannot be, are
    left out.
    """
    threads = {known.thread_id: known for known in known_threads if known.guild_id == guild.id}
    answer = _answer_parent(guild, answer_channel, threads)
    lookup: Mapping[int, discord.Member | None] = members or {}
    verdicts: dict[int, bool] = {}
    shown: set[int] = set()
    if answer is None:
        return shown
    for channel_id in set(candidates):
        # The answer channel's own photos are judged through `answer`, its parent when it is a
        # thread: a thread's history is read with its parent's permissions.
        photo = answer if channel_id == answer_channel.id else _photo_parent(guild, channel_id, threads)
        if photo is None:
            continue
        if photo.id not in verdicts:
            verdicts[photo.id] = _at_least_as_visible(answer, photo, lookup)
        if verdicts[photo.id]:
            shown.add(channel_id)
    return shown


def overwrite_member_ids(
    guild: discord.Guild,
    answer_channel: discord.abc.Snowflake,
    candidates: Iterable[int],
    known_threads: Iterable[KnownThread] = (),
) -> list[int]:
    """Ids of the members `audience_channel_ids` would have to look at, answer channel's first.

    These are the members with their own overwrites (granting reading on the answer channel,
    denying it on a candidate, the answer channel itself included) who are not in the guild's
    cache; the caller may look them up and pass them in as `members`. Without them the channels
    concerned are simply held back.
    """
    threads = {known.thread_id: known for known in known_threads if known.guild_id == guild.id}
    answer = _answer_parent(guild, answer_channel, threads)
    if answer is None:
        return []
    targets = _member_overwrites(answer, _grants)
    wanted = set(candidates)
    photos = {photo.id: photo for cid in wanted if (photo := _photo_parent(guild, cid, threads)) is not None}
    if answer_channel.id in wanted:
        photos[answer.id] = answer
    for photo in photos.values():
        targets.extend(_member_overwrites(photo, _denies))
    ids: list[int] = []
    for target in targets:
        if isinstance(target, discord.Member) or target.id in ids:
            continue
        ids.append(target.id)
    return ids


def nothing() -> Scope:
    """A scope that matches no photo (an asker whose membership cannot be established)."""
    return Scope.channels(set(), set())


__all__ = [
    "KnownThread",
    "audience_channel_ids",
    "can_read_history",
    "nothing",
    "overwrite_member_ids",
    "owner_only_thread_ids",
    "private_thread_asked_in",
    "readable_channel_ids",
]
