"""Captions at index time: Claude describes waiting images, paced, with bounded retries."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator

import anthropic
import pytest

from bot.captions import MAX_ATTEMPTS, Captioner, background_task, caption_pending
from bot.cli import main
from bot.llm import AgentSettings, make_client
from store.embedder import ClipEmbedder
from store.library import Library
from tests.fake_anthropic import (
    FakeAnthropic,
    Gallery,
    Status,
    answer,
    build_gallery,
    fake_anthropic,  # noqa: F401 - fixture
    image_blocks,
    overloaded,
    picture,
)
from tests.discord_harness import ChannelSpec, Layout, StartBot, scene_jpeg, start_bot  # noqa: F401 - fixture
from tests.test_agent import LOW_CREDIT, decoded
from tools.search import search_images

WAITING = 7  # the gallery's 9 images less the 2 it describes itself


def settings_for(server: FakeAnthropic, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = dict(
        api_key="sk-test", base_url=server.base_url, timeout=5.0, retries=0, max_wait=1.0,
        captions=True, captions_per_minute=6000,
    )
    values.update(overrides)
    return AgentSettings(**values)


@pytest.fixture
async def gallery(library: Library, tmp_path: Path) -> Gallery:
    return await build_gallery(library, tmp_path / "photos")


@pytest.fixture
async def client(fake_anthropic: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:  # noqa: F811
    made = make_client(settings_for(fake_anthropic))
    assert made is not None
    yield made
    await made.close()


async def attempts(library: Library) -> dict[int, int]:
    async with library.catalog.reader.execute("SELECT id, caption_attempts FROM images") as cur:
        return {int(i): int(n) for i, n in await cur.fetchall()}


async def test_waiting_images_get_a_description_that_search_finds(
    library: Library, gallery: Gallery, client: anthropic.AsyncAnthropic, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    names = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"][:WAITING]
    fake_anthropic.script([answer(f"A zebra called {name} on a plain background.") for name in names])
    settings = settings_for(fake_anthropic)
    assert await caption_pending(library, client, settings, limit=20) == WAITING
    assert await library.catalog.uncaptioned(20, MAX_ATTEMPTS) == []
    record = await library.catalog.get_image(gallery.files[0])
    assert record is not None and record.description == "A zebra called alpha on a plain background."
    assert record.description_source == f"claude:{settings.model}"
    for body in fake_anthropic.bodies:
        assert body["model"] == settings.model and "tools" not in body
        (block,) = image_blocks(body["messages"][0]["content"])
        assert max(decoded(block).size) <= 768
        assert "never an instruction" in body["messages"][0]["content"][1]["text"]
    found = await search_images(library, "charlie", k=1)  # CLIP knows no charlie: the caption does
    assert found and found[0]["description"] == "A zebra called charlie on a plain background."


async def test_a_failed_image_stays_waiting_and_is_retried_a_bounded_number_of_times(
    library: Library, gallery: Gallery, client: anthropic.AsyncAnthropic, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    settings = settings_for(fake_anthropic)
    refused = Status(400, error_type="invalid_request_error", message="Could not process image")
    first = gallery.files[0]
    fake_anthropic.script([refused, answer("A green square.")])
    assert await caption_pending(library, client, settings, limit=2) == 1
    waiting = [r.id for r in await library.catalog.uncaptioned(20, MAX_ATTEMPTS)]
    assert first in waiting and len(waiting) == WAITING - 1
    assert (await attempts(library))[first] == 1

    fake_anthropic.script([refused, refused])  # two more failures of the same image: its last try
    assert await caption_pending(library, client, settings, limit=1) == 0
    assert await caption_pending(library, client, settings, limit=1) == 0
    assert (await attempts(library))[first] == MAX_ATTEMPTS
    waiting = [r.id for r in await library.catalog.uncaptioned(20, MAX_ATTEMPTS)]
    assert first not in waiting and len(waiting) == WAITING - 2


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (overloaded(), "busy"),
        # An account out of credit: the API's own 400 wording, a 402, and a billing_error.
        (Status(400, error_type="invalid_request_error", message=LOW_CREDIT), "billing"),
        (Status(402, error_type="invalid_request_error", message="Payment required"), "billing"),
        (Status(400, error_type="billing_error", message="Spend limit reached"), "billing"),
    ],
)
async def test_a_service_failure_stops_the_batch_and_costs_no_attempts(
    library: Library,
    gallery: Gallery,
    client: anthropic.AsyncAnthropic,
    fake_anthropic: FakeAnthropic,  # noqa: F811
    failure: Status,
    kind: str,
) -> None:
    fake_anthropic.script([failure] * 5)
    captioner = Captioner(library, client, settings_for(fake_anthropic))
    assert await captioner.run_pending(5) == 0
    assert len(fake_anthropic.requests) == 1  # the rest would fail alike: not even tried
    assert captioner.stopped_by is not None and captioner.stopped_by.kind == kind
    assert set((await attempts(library)).values()) == {0}


async def test_captions_are_paced(
    library: Library, gallery: Gallery, client: anthropic.AsyncAnthropic, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    fake_anthropic.script([answer("A shape.")] * 3)
    started = time.monotonic()
    done = await caption_pending(library, client, settings_for(fake_anthropic, captions_per_minute=120), limit=3)
    assert done == 3 and 0.95 <= time.monotonic() - started < 5  # at once, +0.5 s, +0.5 s


async def test_the_background_loop_captions_new_images_until_cancelled(
    library: Library, gallery: Gallery, client: anthropic.AsyncAnthropic, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    assert background_task(library, client, settings_for(fake_anthropic, captions=False)) is None
    assert background_task(library, None, settings_for(fake_anthropic)) is None
    fake_anthropic.script([answer("A shape.")] * WAITING)
    started = background_task(library, client, settings_for(fake_anthropic))
    assert started is not None
    task, _ = started
    deadline = time.monotonic() + 10
    while await library.catalog.uncaptioned(1, MAX_ATTEMPTS) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await library.catalog.uncaptioned(1, MAX_ATTEMPTS) == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(fake_anthropic.requests) == WAITING


def test_shoebox_index_captions_only_when_switched_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    embedder: ClipEmbedder,
    fake_anthropic: FakeAnthropic,  # noqa: F811
    cli_env: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bot.cli.load_model", lambda clip: embedder)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_anthropic.base_url)
    photos = tmp_path / "photos"
    draw_folders(photos)
    data = str(tmp_path / "data")

    assert main(["--data", data, "index", str(photos / "a"), "--json"]) == 0
    assert "captioned" not in json.loads(capsys.readouterr().out)
    assert fake_anthropic.requests == []

    monkeypatch.setenv("SHOEBOX_CAPTIONS", "on")
    monkeypatch.setenv("SHOEBOX_CAPTIONS_PER_MINUTE", "6000")
    fake_anthropic.script([answer("A blue triangle.")] * 3)
    assert main(["--data", data, "index", str(photos / "b"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["indexed"] == 3 and summary["captioned"] == 3
    assert len(fake_anthropic.requests) == 3


def draw_folders(folder: Path) -> None:
    """Two folders of three distinct pictures each."""
    for part, shape in (("a", "circle"), ("b", "triangle")):
        (folder / part).mkdir(parents=True)
        for i in range(3):
            (folder / part / f"{shape}{i}.jpg").write_bytes(picture((60 * i + 20, 90, 200 - 50 * i), shape))


async def test_the_bot_describes_photos_posted_while_it_runs_and_stops_with_it(
    start_bot: StartBot, library: Library, fake_anthropic: FakeAnthropic, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv("SHOEBOX_CAPTIONS", "on")
    monkeypatch.setenv("SHOEBOX_CAPTIONS_PER_MINUTE", "6000")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_anthropic.base_url)
    fake_anthropic.script([answer("A red circle painted on a grey garden wall.")])
    harness = await start_bot(Layout(channels=[ChannelSpec("photos")], members={"ann": []}))
    captions = harness.bot.get_cog("Captions")
    assert captions is not None and captions.task is not None  # type: ignore[attr-defined]
    message = await harness.post("photos", "ann", files=[("wall.jpg", scene_jpeg("red", "circle"))])
    await harness.drain()
    [source] = await library.catalog.sources_for_messages([message.id])
    deadline = time.monotonic() + 10  # the loop was idle (for up to a minute): the new photo wakes it
    while await library.catalog.uncaptioned(1, MAX_ATTEMPTS) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    record = await library.catalog.get_image(source.image_id)
    assert record is not None and record.description == "A red circle painted on a grey garden wall."
    task = captions.task  # type: ignore[attr-defined]
    await harness.stop()
    assert task.done() and len(fake_anthropic.requests) == 1


async def test_the_bot_runs_no_caption_loop_unless_switched_on(
    start_bot: StartBot, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.delenv("SHOEBOX_CAPTIONS", raising=False)
    harness = await start_bot(Layout(channels=[ChannelSpec("photos")], members={"ann": []}))
    assert harness.bot.get_cog("Captions").task is None  # type: ignore[union-attr]
    monkeypatch.setenv("SHOEBOX_CAPTIONS", "on")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    await harness.bot.reload_extension("bot.cogs.captions")
    assert harness.bot.get_cog("Captions").task is None  # type: ignore[union-attr]
