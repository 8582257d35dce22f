"""The channels a member may be shown right now, with what the cache cannot tell asked of Discord.

`bot.scope` decides from the permissions in discord.py's cache. One thing is not in it: who is in
a private thread. The bot runs without the members intent, so it never learns of members added to
or removed from one; the owner stands in for its members. A moderator can remove even the owner,
though, so before an owner is shown a private thread's photos, Discord is asked whether they are
still in it. Whatever cannot be confirmed (removed, the bot no longer allowed in the thread, an
API error, past `MAX_MEMBERSHIP_LOOKUPS`) is held back: better a photo missing from an answer
than a photo shown to someone shut out of it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

import discord
from discord.http import HTTPClient

from bot.scope import KnownThread, owner_only_thread_ids, readable_channel_ids

log = logging.getLogger(__name__)

# Private threads confirmed per question, one request each, side by side. People rarely own more
# threads with photos in them; those past the limit are held back from this answer.
MAX_MEMBERSHIP_LOOKUPS = 25


async def unconfirmed_threads(http: HTTPClient, user_id: int, thread_ids: Iterable[int]) -> set[int]:
    """The threads of `thread_ids` that Discord does not confirm `user_id` is a member of."""
    ordered = sorted(thread_ids)
    asked = ordered[:MAX_MEMBERSHIP_LOOKUPS]
    if len(ordered) > len(asked):
        log.warning(
            "User %s owns %d private threads with photos; only %d were confirmed, the rest are held back",
            user_id, len(ordered), len(asked),
        )

    async def is_member(thread_id: int) -> bool:
        try:
            await http.get_thread_member(thread_id, user_id)
        except discord.NotFound:
            return False  # removed from the thread (or it is gone)
        except discord.HTTPException as error:
            log.warning("Could not confirm that %s is still in thread %s: %s", user_id, thread_id, error)
            return False
        return True

    answers = await asyncio.gather(*(is_member(thread_id) for thread_id in asked))
    confirmed = {thread_id for thread_id, member in zip(asked, answers) if member}
    return set(ordered) - confirmed


async def confirmed(
    http: HTTPClient,
    guild: discord.Guild,
    member: discord.Member,
    channel_ids: set[int],
    known_threads: Iterable[KnownThread] = (),
    known_member_of: Iterable[int] = (),
) -> set[int]:
    """`channel_ids` (from `readable_channel_ids`, perhaps narrowed since), less the private
    threads among them that `member` reads only as owner and Discord no longer has them in.
    Only those still in `channel_ids` are asked about: narrow first, then confirm. Threads in
    `known_member_of` need no asking."""
    owned = (owner_only_thread_ids(guild, member, known_threads) & channel_ids) - set(known_member_of)
    if not owned:
        return channel_ids
    return channel_ids - await unconfirmed_threads(http, member.id, owned)


async def readable_now(
    http: HTTPClient, guild: discord.Guild, member: discord.Member, known_threads: Iterable[KnownThread] = ()
) -> set[int]:
    """`readable_channel_ids`, less the private threads whose owner Discord no longer has in them."""
    threads = list(known_threads)
    return await confirmed(http, guild, member, readable_channel_ids(guild, member, threads), threads)
