"""Every way the Messages API can fail ends in bounded time with one clear reply.

One table: the fault as the server delivers it, and what the asker must see. Each case runs the
real client against the fake server and is timed; none may hang, raise, or leak a traceback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bot.agent import Agent
from bot.llm import AgentSettings, make_client
from store.library import Library
from tests.fake_anthropic import (
    IN_SCOPE,
    FakeAnthropic,
    Raw,
    Reply,
    Status,
    answer,
    build_gallery,
    fake_anthropic,  # noqa: F401 - fixture
    message,
    overloaded,
    rate_limited,
    tool_use,
)

SEARCH = tool_use("search_images", {"query": "a red circle"})
FAULTS: dict[str, tuple[list[Any], str | None]] = {
    # name: (script, a word the error sentence must contain; None = answered normally)
    "timeout then success": ([Reply(answer("late").body, delay=3.0), answer("ok")], None),
    "timeout every time": ([Reply(answer("x").body, delay=3.0)] * 3, "did not answer"),
    "429 with retry-after then success": ([rate_limited("1"), answer("ok")], None),
    "529 until giving up": ([overloaded()] * 3, "overloaded"),
    "500 until giving up": ([Status(500)] * 3, "Claude"),
    "malformed JSON": ([Raw(b"{not json")], "Claude"),
    "unknown tool then answer": ([message(tool_use("delete_everything", {})), answer("done")], None),
    "schema-violating input then answer": ([message(tool_use("search_images", {"query": 7, "k": "all"})), answer("done")], None),
    "endless tool loop": ([message(SEARCH)] * 30, None),
}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_ends_in_bounded_time_with_a_clear_reply(
    name: str, library: Library, fake_anthropic: FakeAnthropic, tmp_path: Path  # noqa: F811
) -> None:
    await build_gallery(library, tmp_path / "photos")
    script, must_say = FAULTS[name]
    fake_anthropic.script(script)
    settings = AgentSettings(
        api_key="sk-test", base_url=fake_anthropic.base_url, timeout=1.0, retries=2, max_wait=3.0,
        max_steps=3, answer_timeout=20.0,
    )
    client = make_client(settings)
    started = time.monotonic()
    try:
        reply = await Agent(library, settings, client).answer("where is the red circle?", IN_SCOPE)
    finally:
        await client.close()
    elapsed = time.monotonic() - started
    assert elapsed < 20.0, f"{name} took {elapsed:.1f}s"
    assert reply.answer.strip(), "the asker always gets a sentence"
    assert "Traceback" not in reply.answer and "Error(" not in reply.answer
    if must_say is None:
        assert reply.error is None, reply.error
    else:
        assert reply.error and must_say.lower() in reply.error.lower(), reply.error
        assert reply.error.count(".") <= 2, "one clear sentence, not a dump"
    assert len(fake_anthropic.requests) <= 3 + settings.max_steps + 1  # bounded attempts
