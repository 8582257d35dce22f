"""Fifty questions at once while photos are being indexed, against one store and one event loop.

Every answer must be right (the image the tools really found for that question, within the
asker's scope), nothing may fail with "database is locked", and the event loop must never stall
for a second — the bot's heartbeat depends on it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from bot.agent import Agent
from bot.llm import AgentSettings, make_client
from store.library import IncomingImage, Library
from tests.conftest import jpeg_bytes
from tests.fake_anthropic import FakeAnthropic, Reply, answer, fake_anthropic, message, tool_use  # noqa: F401 (fixture)
from tests.test_library import discord_source
from tools.search import Scope, search_images

QUESTIONS = 50
INDEXED_MEANWHILE = 120
READABLE = Scope.channels({1})


def last_user_content(body: dict[str, Any]) -> list[dict[str, Any]]:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def responder(body: dict[str, Any]) -> Reply:
    """Search for what the question says, then cite the first result — read off each request."""
    blocks = last_user_content(body)
    results = [b for b in blocks if b.get("type") == "tool_result"]
    if not results:
        question = next(b["text"] for b in blocks if b.get("type") == "text")
        return message(tool_use("search_images", {"query": question, "k": 3}))
    payload = results[0]["content"]
    text = payload if isinstance(payload, str) else next(p["text"] for p in payload if p["type"] == "text")
    data = json.loads(text)
    found = data["results"] if isinstance(data, dict) else data
    return answer(f"Here it is: [#{found[0]['id']}]")


class LoopLag:
    """Measures how late a 10 ms sleep wakes up: the longest time the loop was blocked."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.perf_counter() - started - 0.01)

    def stop(self) -> None:
        self._stop.set()


async def test_fifty_questions_while_indexing(library: Library, fake_anthropic: FakeAnthropic) -> None:  # noqa: F811
    colours = [(30 + 4 * i, 200 - 3 * i, (90 * i) % 255) for i in range(QUESTIONS)]
    seed = await library.index([IncomingImage(discord_source(i + 1, channel=1), jpeg_bytes(c, mark=i)) for i, c in enumerate(colours)])
    assert all(o.status == "indexed" for o in seed)
    questions = [f"photo number {i} with colour {c}" for i, c in enumerate(colours)]
    expected = {q: (await search_images(library, q, k=1, scope=READABLE))[0]["id"] for q in questions}

    fake_anthropic.respond_with(responder)
    settings = AgentSettings(api_key="sk-test", base_url=fake_anthropic.base_url, retries=0, images_per_result=1)
    agent = Agent(library, settings, make_client(settings))
    lag = LoopLag()
    watcher = asyncio.ensure_future(lag.run())
    meanwhile = [
        IncomingImage(discord_source(1000 + i, channel=2), jpeg_bytes((i % 255, 50, 200 - i % 200), mark=i))
        for i in range(INDEXED_MEANWHILE)
    ]
    started = time.perf_counter()
    indexing = asyncio.ensure_future(library.index(meanwhile))
    replies = await asyncio.wait_for(
        asyncio.gather(*(agent.answer(q, READABLE) for q in questions)), timeout=300
    )
    outcomes = await asyncio.wait_for(indexing, timeout=300)
    elapsed = time.perf_counter() - started
    lag.stop()
    await watcher

    assert all(o.status == "indexed" for o in outcomes)
    assert (await library.catalog.counts())["images"] == QUESTIONS + INDEXED_MEANWHILE
    for question, reply in zip(questions, replies):
        assert reply.error is None, reply.error
        assert [image.id for image in reply.images] == [expected[question]], question
        assert all(image.source["channel_id"] == "1" for image in reply.images)
    assert len(fake_anthropic.requests) == 2 * QUESTIONS
    assert lag.worst < 1.0, f"event loop stalled for {lag.worst:.2f}s"
    print(f"\n{QUESTIONS} answers + {INDEXED_MEANWHILE} images indexed in {elapsed:.1f}s; worst loop lag {lag.worst * 1000:.0f} ms")
