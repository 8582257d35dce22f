"""Starting the bot: a clear line and exit code 1 for every reason it cannot start; a real setup."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.discord_app import INVITE_PERMISSIONS, BotSettings, ShoeboxBot, invite_url, run_bot
from bot.cli import main
from store.settings import Settings
from tests.conftest import NOT_A_DATABASE, sqlite_threads, sqlite_threads_left
from tests.discord_harness import Layout, StartBot, start_bot  # noqa: F401 - fixture


def only_error(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].exc_info is None  # one line, no traceback
    return errors[0]


@pytest.mark.parametrize(
    "error, words",
    [
        (discord.LoginFailure("Improper token has been passed."), "rejected DISCORD_TOKEN"),
        (discord.PrivilegedIntentsRequired(None), "Message Content Intent"),
        (ConnectionRefusedError(111, "Connection refused"), "Cannot reach Discord"),
    ],
)
async def test_start_up_failures_are_one_line_and_exit_1(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception, words: str
) -> None:
    async def failing_start(self: ShoeboxBot, token: str, *, reconnect: bool = True) -> None:
        raise error

    monkeypatch.setattr(ShoeboxBot, "start", failing_start)
    caplog.set_level(logging.INFO)
    assert await run_bot(settings, BotSettings(token="token")) == 1
    assert words in only_error(caplog).getMessage()


async def test_an_unreachable_gateway_is_one_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A real login attempt against a host that cannot exist (.invalid never resolves)."""
    monkeypatch.setattr(discord.http.Route, "BASE", "https://discord.invalid/api/v10")
    caplog.set_level(logging.INFO)
    assert await run_bot(settings, BotSettings(token="token")) == 1
    assert "Cannot reach Discord" in only_error(caplog).getMessage()


def test_missing_token_from_the_command_line(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    caplog.set_level(logging.INFO)
    assert main(["--data", str(tmp_path / "data"), "bot"]) == 1
    assert "DISCORD_TOKEN is not set" in only_error(caplog).getMessage()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISCORD_TOKEN", "SHOEBOX_DEV_GUILD", "SHOEBOX_REACTION", "SHOEBOX_QUEUE_MAX", "SHOEBOX_QUEUE_BATCH",
                 "SHOEBOX_SYNC_COMMANDS", "SHOEBOX_ANSWER_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    defaults = BotSettings.from_env(max_file_bytes=1234)
    assert defaults.token is None and defaults.dev_guild is None and defaults.sync_commands
    assert defaults.reaction == "\N{CAMERA WITH FLASH}" and defaults.queue.max_file_bytes == 1234
    monkeypatch.setenv("DISCORD_TOKEN", " abc ")
    monkeypatch.setenv("SHOEBOX_DEV_GUILD", "123456789012345678")
    monkeypatch.setenv("SHOEBOX_REACTION", "off")
    monkeypatch.setenv("SHOEBOX_QUEUE_MAX", "10")
    chosen = BotSettings.from_env()
    assert chosen.token == "abc" and chosen.dev_guild == 123456789012345678
    assert chosen.reaction is None and chosen.queue.max_pending == 10
    monkeypatch.setenv("SHOEBOX_DEV_GUILD", "my-server")
    with pytest.raises(ValueError, match="SHOEBOX_DEV_GUILD"):
        BotSettings.from_env()


async def test_setup_hook_builds_everything_and_close_releases_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production start-up path minus the network: model, library, job file, agent, cogs, sync."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    synced: list[Any] = []

    async def fake_sync(self: Any, *, guild: Any = None) -> list[Any]:
        synced.append(guild)
        return []

    monkeypatch.setattr(discord.app_commands.CommandTree, "sync", fake_sync)
    bot = ShoeboxBot(settings, BotSettings(token="t", dev_guild=42))
    assert bot.intents.message_content and bot.intents.guild_messages and bot.intents.dm_messages
    assert not bot.intents.members and not bot.intents.presences
    await bot._async_setup_hook()
    await bot.setup_hook()
    try:
        assert set(bot.cogs) == {"Indexing", "Ask", "Admin", "ForgetMenu", "Captions"}
        assert bot.library is not None and bot.jobs is not None
        assert not bot.agent.online  # type: ignore[attr-defined]
        assert [g.id for g in synced] == [42]
        assert (settings.data_dir / "bot.sqlite3").is_file()
        assert bot.get_cog("Indexing").queue.running  # type: ignore[union-attr]
    finally:
        await bot.close()
    assert bot.get_cog("Indexing") is None
    with pytest.raises(AssertionError):
        bot.jobs.conn  # closed


async def test_a_damaged_job_file_is_one_line_and_leaves_nothing_open(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Start-up as `login` runs it (the hooks after Discord accepted the token), with the bot's
    job file damaged: the library opened before it is closed again, and the error is one line."""

    async def start_without_network(self: ShoeboxBot, token: str, *, reconnect: bool = True) -> None:
        await self._async_setup_hook()
        await self.setup_hook()

    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "bot.sqlite3").write_bytes(NOT_A_DATABASE)
    monkeypatch.setattr(ShoeboxBot, "start", start_without_network)
    before = sqlite_threads()
    caplog.set_level(logging.INFO)
    assert await run_bot(settings, BotSettings(token="token", sync_commands=False)) == 1
    assert "bot.sqlite3 cannot be opened as a database" in only_error(caplog).getMessage()
    assert not sqlite_threads_left(before)


def test_the_readmes_invite_link_asks_for_what_the_bot_needs() -> None:
    """The README's hand-written link must grant exactly the permissions the bot is built for
    (sending in threads is its own permission: without it, no answer in a thread)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    links = re.findall(r"https://discord\.com/oauth2/authorize\?client_id=YOUR_APPLICATION_ID\S*?(?=`)", readme)
    assert links == [invite_url(0).replace("client_id=0", "client_id=YOUR_APPLICATION_ID")]
    assert INVITE_PERMISSIONS.send_messages_in_threads and INVITE_PERMISSIONS.attach_files


async def test_a_bot_in_no_server_logs_its_invite_link(start_bot: StartBot, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    harness = await start_bot(Layout(members={"ann": []}))
    await harness.remove_bot_from_guild()
    with caplog.at_level("INFO", logger="bot.discord_app"):
        await harness.bot.on_ready()
    assert f"add the bot with {invite_url(harness.world.application_id)}" in caplog.text
