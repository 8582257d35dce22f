"""Captions in the bot: with `SHOEBOX_CAPTIONS=on`, new photos get Claude's description in the
background (the loop, its pacing and its retries are in bot/captions.py).

A cog of its own so that it starts with the bot and stops before the library closes, and so that
a bot without captions carries nothing of it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import anthropic
from discord.ext import commands

from bot.captions import Captioner, background_task
from bot.llm import AgentSettings, make_client
from bot.tasks import cancel_and_wait

if TYPE_CHECKING:
    from bot.discord_app import ShoeboxBot

log = logging.getLogger(__name__)


class Captions(commands.Cog):
    """Runs the caption loop for as long as the bot runs."""

    def __init__(self, bot: "ShoeboxBot") -> None:
        self.bot = bot
        self.client: anthropic.AsyncAnthropic | None = None
        self.task: asyncio.Task[None] | None = None
        self.captioner: Captioner | None = None

    async def cog_load(self) -> None:
        settings = AgentSettings.from_env()
        if not settings.captions:
            return
        assert self.bot.library is not None
        self.client = make_client(settings)
        started = background_task(self.bot.library, self.client, settings)
        if started is None:  # captions are on, so it is the key that is missing
            log.warning("SHOEBOX_CAPTIONS is on but ANTHROPIC_API_KEY is not set: no captions will be written.")
            return
        self.task, self.captioner = started
        log.info("Describing new photos in the background, at most %d a minute", settings.captions_per_minute)

    @commands.Cog.listener()
    async def on_new_images(self, count: int) -> None:
        """The indexing queue stored new images: describe them now, not at the loop's next round."""
        if self.captioner is not None:
            self.captioner.wake()

    async def cog_unload(self) -> None:
        await cancel_and_wait(self.task)
        if self.client is not None:
            await self.client.close()


async def setup(bot: "ShoeboxBot") -> None:
    await bot.add_cog(Captions(bot))
