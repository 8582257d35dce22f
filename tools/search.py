"""The three tools: find images by text, find look-alikes, and read what is known about one image.

They are plain async functions over a `Library`, returning JSON-ready dicts that a person can read
in a terminal and a language model can read in a tool result. The caller's `Scope` (what the asker
may see) is applied inside the search itself, never by trimming results afterwards, so a narrow
scope still gets k results whenever k visible images exist — and never a result from outside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from store.db import ImageRecord, SourceFilter, SourceRecord, to_iso
from store.ingest import RejectedImage, read_limited
from store.library import Library

MAX_K = 25
DEFAULT_K = 5
MAX_QUERY_CHARS = 500
SHORT_DESCRIPTION_CHARS = 200
SORTS = ("relevance", "newest", "oldest")


class ToolError(ValueError):
    """A tool could not do what was asked; the message is safe to show to a person or a model."""


@dataclass(frozen=True)
class Scope:
    """Which sources the asker may see.

    `channel_ids=None` means every Discord channel (the terminal's view); the Discord layer passes
    the exact set of channels the asker can read, with `include_files=False`.
    """

    channel_ids: frozenset[int] | None = None
    guild_ids: frozenset[int] | None = None
    include_files: bool = True

    @classmethod
    def everything(cls) -> "Scope":
        return cls()

    @classmethod
    def channels(cls, channel_ids: set[int] | frozenset[int], guild_ids: set[int] | None = None) -> "Scope":
        return cls(
            channel_ids=frozenset(channel_ids),
            guild_ids=frozenset(guild_ids) if guild_ids is not None else None,
            include_files=False,
        )


@dataclass(frozen=True)
class Filters:
    """What people narrow a photo search by: who posted it, where, when; and how to order it."""

    author: str | None = None
    channel: str | None = None
    after: str | None = None
    before: str | None = None
    sort: str = "relevance"

    def source_filter(self, scope: Scope) -> SourceFilter:
        if self.sort not in SORTS:
            raise ToolError(f"sort must be one of {', '.join(SORTS)}, not {self.sort!r}")
        after = parse_date(self.after, "after") if self.after else None
        before = parse_date(self.before, "before", end_of_day=True) if self.before else None
        if after is not None and before is not None and after >= before:
            # Most likely the two were swapped; an empty result would hide that.
            raise ToolError(f"after ({self.after}) must be earlier than before ({self.before})")
        return SourceFilter(
            channel_ids=scope.channel_ids,
            guild_ids=scope.guild_ids,
            include_files=scope.include_files,
            author=(self.author or "").strip() or None,
            channel=(self.channel or "").strip() or None,
            after=after,
            before=before,
        )


_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_date(text: str, name: str, end_of_day: bool = False) -> str:
    """Accept `YYYY-MM-DD` or a full ISO time; a bare `before` date includes that whole day."""
    raw = text.strip()
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ToolError(f"{name} must be a date like 2024-07-31, not {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    if end_of_day and _DATE_ONLY.match(raw):
        moment += timedelta(days=1)
    return to_iso(moment)


def _check_k(k: int) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ToolError("k must be a whole number") from None
    if not 1 <= k <= MAX_K:
        raise ToolError(f"k must be between 1 and {MAX_K}")
    return k


def message_url(source: SourceRecord) -> str | None:
    if source.kind != "discord" or source.channel_id is None or source.message_id is None:
        return None
    guild = source.guild_id if source.guild_id is not None else "@me"
    return f"https://discord.com/channels/{guild}/{source.channel_id}/{source.message_id}"


def _short(text: str | None, limit: int = SHORT_DESCRIPTION_CHARS) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def describe_source(source: SourceRecord) -> dict[str, Any]:
    """A source as plain JSON (snowflake ids as strings: they exceed JavaScript's safe integers)."""
    if source.kind == "file":
        return {"kind": "file", "path": source.path, "filename": source.filename, "modified_at": source.posted_at}
    out: dict[str, Any] = {
        "kind": "discord",
        "guild_id": str(source.guild_id) if source.guild_id is not None else None,
        "channel_id": str(source.channel_id),
        "channel": source.channel_name,
        "message_id": str(source.message_id),
        "author": source.author_name,
        "author_id": str(source.author_id) if source.author_id is not None else None,
        "posted_at": source.posted_at,
        "filename": source.filename,
        "message_url": message_url(source),
    }
    return out


def result_dict(record: ImageRecord, source: SourceRecord, score: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": record.id}
    if score is not None:
        out["score"] = round(float(score), 4)
    out["source"] = describe_source(source)
    if source.kind == "file":
        out["path"] = source.path
    else:
        out["message_url"] = message_url(source)
    out["description"] = _short(record.description)
    if source.posted_text:
        out["posted_text"] = _short(source.posted_text)
    out["posted_at"] = source.posted_at
    out["width"], out["height"] = record.width, record.height
    return out


async def _results(
    library: Library, hits: list[tuple[int, float]], flt: SourceFilter, sort: str
) -> list[dict[str, Any]]:
    ids = [image_id for image_id, _ in hits]
    records = await library.catalog.get_images(ids)
    sources = await library.catalog.sources_of(ids, flt)
    results = []
    for image_id, score in hits:
        if image_id in records and sources.get(image_id):
            results.append(result_dict(records[image_id], sources[image_id][0], score))
    if sort != "relevance":
        results.sort(key=lambda r: r["posted_at"], reverse=(sort == "newest"))
    return results


async def search_images(
    library: Library,
    query: str,
    k: int = DEFAULT_K,
    scope: Scope = Scope(),
    filters: Filters = Filters(),
) -> list[dict[str, Any]]:
    """Images whose content (CLIP) or words (descriptions, posted text) match `query`, best first."""
    query = (query or "").strip()
    if not query:
        raise ToolError("query is empty: say what the photo shows")
    if len(query) > MAX_QUERY_CHARS:
        raise ToolError(f"query is too long (over {MAX_QUERY_CHARS} characters)")
    k = _check_k(k)
    flt = filters.source_filter(scope)
    hits = await library.search_text(query, k, flt)
    return await _results(library, hits, flt, filters.sort)


async def find_similar(
    library: Library,
    image: bytes | Image.Image | Path | int,
    k: int = DEFAULT_K,
    scope: Scope = Scope(),
    filters: Filters = Filters(),
) -> list[dict[str, Any]]:
    """Images that look like `image`: new bytes, a decoded picture, a file, or an indexed id."""
    k = _check_k(k)
    flt = filters.source_filter(scope)
    exclude: list[int] = []
    if isinstance(image, bool):
        raise ToolError("image must be an image id or an image")
    if isinstance(image, int):
        await _visible_record(library, image, scope)
        vector = await library.vector_of(image)
        if vector is None:
            raise ToolError(f"image {image} has no vector yet; try again shortly")
        exclude.append(image)
    else:
        if isinstance(image, Path):
            try:  # a regular file within the size limit, checked before anything is read
                image = read_limited(image, library.settings.ingest.max_file_bytes)
            except RejectedImage as error:
                raise ToolError(f"cannot use {image}: {error}") from None
        if isinstance(image, bytes):
            try:
                image = (await library.decode(image)).image
            except RejectedImage as error:
                raise ToolError(f"that file cannot be used: {error}") from None
        vector = (await library.embed_images([image]))[0]
    hits = await library.search_vector(vector, k, flt, exclude=exclude)
    return await _results(library, hits, flt, filters.sort)


async def _visible_record(library: Library, image_id: int, scope: Scope) -> tuple[ImageRecord, list[SourceRecord]]:
    """The image and its sources the asker may see; an invisible image looks exactly like a missing one."""
    try:
        image_id = int(image_id)
    except (TypeError, ValueError):
        raise ToolError("image_id must be a whole number") from None
    record = await library.catalog.get_image(image_id)
    flt = Filters().source_filter(scope)
    sources = (await library.catalog.sources_of([image_id], flt)).get(image_id, []) if record else []
    if record is None or not sources:
        raise ToolError(f"there is no image with id {image_id}")
    return record, sources


async def get_description(library: Library, image_id: int, scope: Scope = Scope()) -> dict[str, Any]:
    """Everything stored about one image the asker may see: description, posts, size."""
    record, sources = await _visible_record(library, image_id, scope)
    out = result_dict(record, sources[0], None)
    out["description"] = record.description
    out["description_source"] = record.description_source
    out["posts"] = [
        {**describe_source(s), "posted_text": s.posted_text or None} for s in sources[:10]
    ]
    out["stored_copy"] = str(library.thumb_path(record).resolve())
    return out


async def image_record(library: Library, image_id: int, scope: Scope = Scope()) -> tuple[ImageRecord, list[SourceRecord]]:
    """The record behind a result, checked against the scope (for posting or showing its image)."""
    return await _visible_record(library, image_id, scope)
