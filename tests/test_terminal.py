"""`shoebox ask` and `shoebox chat` as a user runs them, against the fake Messages API or offline."""

from __future__ import annotations

import asyncio
import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from bot.cli import main
from store.embedder import ClipEmbedder
from store.library import Library
from store.settings import Settings
from tests.conftest import tiny_clip_settings
from tests.fake_anthropic import (
    FakeAnthropic,
    Gallery,
    Status,
    answer,
    build_gallery,
    fake_anthropic,  # noqa: F401 - fixture
    message,
    tool_use,
)

Run = Callable[..., tuple[int, Any]]


@pytest.fixture
def indexed(tmp_path: Path, embedder: ClipEmbedder) -> tuple[Path, Gallery]:
    """A data folder holding the test gallery, written with the session's model."""
    data = tmp_path / "data"

    async def build() -> Gallery:
        library = await Library.open(Settings(data_dir=data, clip=tiny_clip_settings()), embedder)
        try:
            return await build_gallery(library, tmp_path / "photos")
        finally:
            await library.close()

    return data, asyncio.run(build())


@pytest.fixture
def shoebox(
    indexed: tuple[Path, Gallery],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    embedder: ClipEmbedder,
    cli_env: None,
) -> Run:
    """Run `shoebox --data DATA ...` in-process; returns (exit code, stdout parsed if --json)."""
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr("bot.cli.load_model", lambda clip: embedder)  # the same weights, loaded once

    def run(*args: str) -> tuple[int, Any]:
        code = main(["--data", str(indexed[0]), *args])
        out = capsys.readouterr().out
        return code, (json.loads(out) if "--json" in args else out)

    return run


def online(monkeypatch: pytest.MonkeyPatch, server: FakeAnthropic) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-dummy")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
    monkeypatch.setenv("SHOEBOX_LLM_RETRIES", "0")


def test_ask_shows_only_images_from_this_turns_tool_results(
    shoebox: Run, indexed: tuple[Path, Gallery], monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    gallery = indexed[1]
    online(monkeypatch, fake_anthropic)
    secret, elsewhere = gallery.secret[0], gallery.files[0]
    fake_anthropic.script(
        [
            message(tool_use("search_images", {"query": "a red circle", "channel": "secret"})),
            answer(f"Eve posted it [#{secret}]; also see [#{elsewhere}]."),
        ]
    )
    code, out = shoebox("ask", "where is the red circle?", "--json")
    assert code == 0
    assert set(out) == {"answer", "images", "offline"} and out["offline"] is False
    assert out["answer"] == f"Eve posted it [#{secret}]; also see."
    (image,) = out["images"]
    assert image["id"] == secret and image["message_url"] == "https://discord.com/channels/1/222/50"
    assert image["source"]["author"] == "Eve" and image["description"] == "a red circle with the launch codes"
    assert isinstance(image["score"], float) and Path(image["stored_copy"]).is_file()
    assert fake_anthropic.requests[0].path == "/v1/messages"  # ANTHROPIC_BASE_URL was honoured


def test_ask_prints_the_answer_and_where_each_image_is(
    shoebox: Run, indexed: tuple[Path, Gallery], monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    first = indexed[1].files[0]
    online(monkeypatch, fake_anthropic)
    fake_anthropic.script([message(tool_use("get_description", {"image_id": first})), answer(f"This one [#{first}].")])
    code, out = shoebox("ask", "the", "red", "circle")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"This one [#{first}]."
    assert lines[1].startswith(f"  [#{first}]") and lines[1].endswith("photos/red-circle.jpg")


def test_ask_without_a_key_answers_offline_with_search_results(shoebox: Run, indexed: tuple[Path, Gallery]) -> None:
    code, out = shoebox("ask", "red circle", "--json")
    assert code == 0 and out["offline"] is True
    assert "ANTHROPIC_API_KEY" in out["answer"]
    assert len(out["images"]) == 5  # everything is in scope in a terminal
    assert all(isinstance(i["score"], float) and ("path" in i or "message_url" in i) for i in out["images"])


def test_ask_with_an_image_offline_finds_it_first(shoebox: Run, indexed: tuple[Path, Gallery], tmp_path: Path) -> None:
    code, out = shoebox("ask", "this one?", "--image", str(tmp_path / "photos" / "red-circle.jpg"), "--json")
    assert code == 0 and out["offline"] is True
    assert out["images"][0]["id"] == indexed[1].files[0] and out["images"][0]["score"] > 0.99


def test_ask_with_an_attachment_that_is_no_image_says_so_offline(shoebox: Run, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: eggs, milk")
    code, out = shoebox("ask", "red circle", "--image", str(notes), "--json")
    assert code == 0 and out["images"]  # the words are still searched
    assert "instead (notes.txt: " in out["answer"]


def test_ask_with_a_rejected_key_exits_1_naming_the_variable(
    shoebox: Run, monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    online(monkeypatch, fake_anthropic)
    fake_anthropic.script([Status(401, error_type="authentication_error", message="invalid x-api-key")])
    code, out = shoebox("ask", "red circle", "--json")
    assert code == 1 and "ANTHROPIC_API_KEY" in out["error"] and out["answer"].startswith(out["error"])


def test_chat_keeps_the_conversation_and_ends_on_exit(
    shoebox: Run, monkeypatch: pytest.MonkeyPatch, fake_anthropic: FakeAnthropic  # noqa: F811
) -> None:
    online(monkeypatch, fake_anthropic)
    fake_anthropic.script([answer("Two red things."), answer("The first was a circle."), answer("never")])
    monkeypatch.setattr("sys.stdin", io.StringIO("any red things?\n\nwhat was the first?\nexit\nignored\n"))
    code, out = shoebox("chat")
    assert code == 0 and "Two red things." in out and "The first was a circle." in out
    assert len(fake_anthropic.bodies) == 2
    assert fake_anthropic.bodies[1]["messages"] == [
        {"role": "user", "content": "any red things?"},
        {"role": "assistant", "content": "Two red things."},
        {"role": "user", "content": "what was the first?"},
    ]


def test_chat_ends_at_end_of_input(shoebox: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("blue triangle"))
    code, out = shoebox("chat")
    assert code == 0 and "ANTHROPIC_API_KEY" in out and "[#" in out


async def test_a_piped_chat_reads_its_lines_whole_whatever_their_ends() -> None:
    from bot.terminal import _PipedLines

    read_end, write_end = os.pipe()
    os.write(write_end, "one\r\ntwo, caf\u00e9\nthree".encode())
    os.close(write_end)
    try:
        lines = _PipedLines(read_end, "utf-8")
        assert [await lines.readline("") for _ in range(4)] == ["one", "two, caf\u00e9", "three", None]
    finally:
        os.close(read_end)
