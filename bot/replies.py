"""Turning an answer into Discord messages: clean splits, one embed per photo, within Discord's limits.

Pure formatting: no network, no discord.py client; the only I/O is a `stat` of each stored copy to
respect the upload size limit. The Discord layer sends what `plan_reply` returns, in order.

Limits respected (Discord's, as of API v10): 2,000 characters of content per message, 10
attachments and 10 embeds per message, 6,000 characters over a message's embeds, a per-upload size limit (10 MiB unless the guild is
boosted; the caller passes the guild's actual limit), 256 characters in an embed title and field
name, 1,024 in a field value, 4,096 in an embed description.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import discord

MESSAGE_LIMIT = 2000
MAX_ATTACHMENTS = 10
MAX_EMBEDS = 10
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
_TITLE_LIMIT = 256
_FIELD_LIMIT = 1024
_TEXT_PREVIEW = 200
EMBED_TOTAL_LIMIT = 6000  # characters over all embeds of one message
_FENCE = "```"
_FENCE_ROOM = 12  # room kept in each piece for closing and reopening a code block

# Boundaries tried in order: paragraphs, lines, sentences, words. A piece is cut mid-word only
# when a single word is longer than a whole message.
_BOUNDARIES = (
    re.compile(r"\n[ \t]*\n\s*"),
    re.compile(r"\n"),
    re.compile(r"(?<=[.!?…])[\"')\]]?\s+"),
    re.compile(r"\s+"),
)


class ShownImageLike(Protocol):
    """What a reply needs from one image the agent chose to show (bot.agent.ShownImage)."""

    id: int
    score: float | None
    source: Mapping[str, Any]
    message_url: str | None
    description: str | None
    stored_copy: Path


# ---- text ------------------------------------------------------------------------------------


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split `text` into pieces of at most `limit` characters at the cleanest boundary available.

    Paragraphs stay whole when they fit, then lines, then sentences, then words. A code block cut
    in two is closed at the end of one piece and reopened (with its language) at the start of the
    next, so formatting never bleeds into the rest of the answer.
    """
    text = text.strip()
    if not text:
        return []
    if len(text) <= limit:
        return [text]
    fenced = _FENCE in text
    pieces = _split(text, limit - _FENCE_ROOM if fenced else limit, 0)
    return _balance_fences(pieces) if fenced else pieces


def _split(text: str, limit: int, level: int) -> list[str]:
    if len(text) <= limit:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i : i + limit] for i in range(0, len(text), limit)]
    segments: list[tuple[str, str]] = []  # (text, the separator that followed it)
    position = 0
    for match in _BOUNDARIES[level].finditer(text):
        segments.append((text[position : match.start()], match.group()))
        position = match.end()
    segments.append((text[position:], ""))
    pieces: list[str] = []
    current = ""
    for segment, separator in segments:
        if len(current) + len(segment) <= limit:
            current += segment + separator
            continue
        if current.strip():
            pieces.append(current.rstrip())
        if len(segment) > limit:
            inner = _split(segment, limit, level + 1)
            pieces.extend(inner[:-1])
            current = inner[-1] + separator
        else:
            current = segment + separator
    if current.strip():
        pieces.append(current.rstrip())
    return pieces


def _balance_fences(pieces: list[str]) -> list[str]:
    out: list[str] = []
    reopen = ""
    for piece in pieces:
        piece = reopen + piece
        reopen = ""
        opening: str | None = None
        for line in piece.split("\n"):
            stripped = line.strip()
            if stripped.startswith(_FENCE):
                opening = None if opening is not None else stripped
        if opening is not None:
            piece += "\n" + _FENCE
            reopen = opening + "\n"
        out.append(piece)
    return out


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# ---- images ----------------------------------------------------------------------------------


def attachment_name(image: ShownImageLike) -> str:
    """The upload's file name: stable and safe, whatever the original was called."""
    suffix = image.stored_copy.suffix.lower() or ".jpg"
    return f"shoebox-{image.id}{suffix}"


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def image_embed(image: ShownImageLike, filename: str | None) -> discord.Embed:
    """One photo's card: who posted it, where, when, a jump link, and the photo itself.

    `filename` names the attached stored copy; None when it could not be attached (missing or too
    large), in which case the card still says where to find the original.
    """
    source = image.source or {}
    author = source.get("author") or "someone"
    channel_id = source.get("channel_id")
    channel_name = source.get("channel")
    posted = _parse_time(source.get("posted_at"))
    url = image.message_url or source.get("message_url")
    embed = discord.Embed(
        title=_clip(f"#{channel_name}" if channel_name else "A photo", _TITLE_LIMIT),
        url=url or None,
        timestamp=posted,
        colour=discord.Colour.blurple(),
    )
    embed.add_field(name="Posted by", value=_clip(str(author), _FIELD_LIMIT), inline=True)
    embed.add_field(
        name="Channel",
        value=f"<#{channel_id}>" if channel_id else _clip(str(channel_name or "unknown"), _FIELD_LIMIT),
        inline=True,
    )
    if posted is not None:
        embed.add_field(name="Date", value=f"<t:{int(posted.timestamp())}:D>", inline=True)
    if url:
        embed.add_field(name="Original", value=f"[Jump to message]({url})", inline=False)
    text = source.get("posted_text") or image.description
    if text:
        embed.description = _clip(str(text), _TEXT_PREVIEW)
    footer = f"Image #{image.id}"
    if image.score is not None:
        footer += f" · match {image.score:.2f}"
    embed.set_footer(text=footer)
    if filename:
        embed.set_image(url=f"attachment://{filename}")
    return embed


@dataclass
class OutgoingFile:
    """A stored copy to upload under `filename`."""

    path: Path
    filename: str

    def to_discord(self) -> discord.File:
        return discord.File(self.path, filename=self.filename)


@dataclass
class OutgoingMessage:
    """One Discord message of a reply."""

    content: str | None = None
    files: list[OutgoingFile] = field(default_factory=list)
    embeds: list[discord.Embed] = field(default_factory=list)


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def image_line(image: ShownImageLike) -> str:
    """One photo as a line of text, for where cards cannot be shown: which image, where it was
    posted, by whom, and the link to the original."""
    source = image.source or {}
    channel = source.get("channel")
    parts = [f"Image #{image.id}"]
    if channel:
        parts.append(_clip(f"#{channel}", _TITLE_LIMIT))
    parts.append(_clip(f"posted by {source.get('author') or 'someone'}", _TITLE_LIMIT))
    url = image.message_url or source.get("message_url")
    if url:
        parts.append(str(url))
    return " \u00b7 ".join(parts)


def plan_reply(
    answer: str,
    images: Sequence[ShownImageLike],
    *,
    note: str | None = None,
    upload_limit: int = DEFAULT_UPLOAD_LIMIT,
    limit: int = MESSAGE_LIMIT,
    cards: bool = True,
) -> list[OutgoingMessage]:
    """The messages that carry `answer` (split cleanly) and then `images` (one card each).

    The photos ride on the last text message when they fit, so a short answer is one message.
    Each message stays within 10 attachments, 10 embeds and the upload limit (counted over all of
    its files, which is how Discord checks a request); a photo whose stored copy is missing or too
    big still gets its card, without the picture.

    `cards=False` is for where the bot may not embed links: Discord would drop the cards without
    a word, so each photo gets a line of text under the answer instead, beside its picture.
    """
    text = answer.strip()
    if note:
        text = f"{text}\n\n{note}" if text else note
    if not cards and images:
        text = "\n".join([text, "", *map(image_line, images)]).strip()
    messages = [OutgoingMessage(content=piece) for piece in split_message(text, limit)]
    batch = OutgoingMessage()
    batch_bytes = batch_chars = 0
    batches: list[OutgoingMessage] = []
    for image in images:
        size = _file_size(image.stored_copy)
        attach = size is not None and size <= upload_limit
        filename = attachment_name(image) if attach else None
        embeds = [image_embed(image, filename)] if cards else []
        full = (
            len(batch.embeds) >= MAX_EMBEDS
            or batch_chars + sum(map(len, embeds)) > EMBED_TOTAL_LIMIT
            or (attach and (len(batch.files) >= MAX_ATTACHMENTS or batch_bytes + (size or 0) > upload_limit))
        )
        if full and (batch.embeds or batch.files):
            batches.append(batch)
            batch, batch_bytes, batch_chars = OutgoingMessage(), 0, 0
        if filename:
            batch.files.append(OutgoingFile(image.stored_copy, filename))
            batch_bytes += size or 0
        batch.embeds.extend(embeds)
        batch_chars += sum(map(len, embeds))
    if batch.embeds or batch.files:
        batches.append(batch)
    if batches and messages:
        messages[-1].files, messages[-1].embeds = batches[0].files, batches[0].embeds
        batches = batches[1:]
    return messages + batches


__all__ = [
    "DEFAULT_UPLOAD_LIMIT",
    "MAX_ATTACHMENTS",
    "MAX_EMBEDS",
    "MESSAGE_LIMIT",
    "OutgoingFile",
    "OutgoingMessage",
    "attachment_name",
    "image_embed",
    "image_line",
    "plan_reply",
    "split_message",
]
