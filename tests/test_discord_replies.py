"""Reply formatting: clean splits under 2,000 characters, one card per photo, Discord's limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.replies import (
    EMBED_TOTAL_LIMIT,
    MAX_ATTACHMENTS,
    MESSAGE_LIMIT,
    image_embed,
    plan_reply,
    split_message,
)


@dataclass
class Shown:
    id: int
    stored_copy: Path
    score: float | None = 0.31
    source: dict[str, Any] = field(default_factory=dict)
    message_url: str | None = None
    description: str | None = None


def shown(tmp_path: Path, image_id: int, size: int = 1000, **source: Any) -> Shown:
    path = tmp_path / f"{image_id:04d}.jpg"
    path.write_bytes(b"x" * size)
    url = f"https://discord.com/channels/1/2/{image_id}"
    base = {
        "kind": "discord", "author": "Ann", "channel": "general", "channel_id": "2",
        "posted_at": "2024-07-14T10:00:00+00:00", "message_url": url,
    }
    return Shown(image_id, path, source={**base, **source}, message_url=url)


def test_short_text_is_one_piece_and_empty_text_is_none() -> None:
    assert split_message("  hello  ") == ["hello"]
    assert split_message("   ") == []


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 150 for i in range(8)]
    text = "\n\n".join(p.strip() for p in paragraphs)
    pieces = split_message(text)
    assert all(len(piece) <= MESSAGE_LIMIT for piece in pieces)
    assert len(pieces) > 1
    for piece in pieces:  # every piece starts at a paragraph start and ends at a paragraph end
        assert piece.startswith("Paragraph ")
        assert piece.endswith("word")
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())


def test_a_long_paragraph_splits_between_sentences() -> None:
    text = " ".join(f"Sentence number {i} is here and says a few things." for i in range(120))
    pieces = split_message(text)
    assert len(pieces) > 1 and all(len(p) <= MESSAGE_LIMIT for p in pieces)
    assert all(p.endswith(".") for p in pieces)
    assert all(p.startswith("Sentence number") for p in pieces)


def test_words_then_hard_cuts_as_a_last_resort() -> None:
    words = " ".join(["abcdefghij"] * 500)
    pieces = split_message(words)
    assert all(len(p) <= MESSAGE_LIMIT for p in pieces)
    assert all(not p.startswith(" ") and not p.endswith(" ") for p in pieces)
    assert all(set(p.split()) == {"abcdefghij"} for p in pieces)
    blob = "x" * 4500
    assert [len(p) for p in split_message(blob)] == [2000, 2000, 500]


def test_a_code_block_cut_in_two_is_closed_and_reopened() -> None:
    code = "Here:\n\n```python\n" + "\n".join(f"value_{i} = {i}" for i in range(400)) + "\n```\n\nDone."
    pieces = split_message(code)
    assert len(pieces) > 2
    for piece in pieces:
        assert len(piece) <= MESSAGE_LIMIT
        assert piece.count("```") % 2 == 0, piece[:40]
    assert all(p.startswith("```python") for p in pieces[1:])


@pytest.mark.parametrize("limit", [50, 200, 2000])
def test_every_limit_is_respected(limit: int) -> None:
    text = ("Lorem ipsum dolor sit amet. " * 40 + "\n\n") * 6
    pieces = split_message(text, limit)
    assert pieces and all(0 < len(p) <= limit for p in pieces)


def test_card_says_who_where_when_with_a_jump_link(tmp_path: Path) -> None:
    image = shown(tmp_path, 7, posted_text="our dog at the beach")
    embed = image_embed(image, "shoebox-7.jpg")
    fields = {f.name: f.value for f in embed.fields}
    assert fields["Posted by"] == "Ann"
    assert fields["Channel"] == "<#2>"
    assert fields["Date"].startswith("<t:") and fields["Date"].endswith(":D>")
    assert "https://discord.com/channels/1/2/7" in fields["Original"]
    assert embed.url == "https://discord.com/channels/1/2/7"
    assert embed.title == "#general"
    assert embed.image.url == "attachment://shoebox-7.jpg"
    assert embed.timestamp is not None and embed.timestamp.year == 2024
    assert embed.description == "our dog at the beach"
    assert embed.footer.text == "Image #7 · match 0.31"


def test_photos_ride_on_the_last_text_message(tmp_path: Path) -> None:
    images = [shown(tmp_path, i) for i in range(3)]
    parts = plan_reply("Found three.", images)
    assert len(parts) == 1
    assert parts[0].content == "Found three."
    assert [f.filename for f in parts[0].files] == ["shoebox-0.jpg", "shoebox-1.jpg", "shoebox-2.jpg"]
    assert len(parts[0].embeds) == 3


def test_at_most_ten_attachments_per_message(tmp_path: Path) -> None:
    images = [shown(tmp_path, i) for i in range(23)]
    parts = plan_reply("Lots.", images)
    assert [len(p.files) for p in parts] == [10, 10, 3]
    assert all(len(p.embeds) <= MAX_ATTACHMENTS for p in parts)
    assert sum(len(p.embeds) for p in parts) == 23


def test_upload_size_limit_splits_messages_and_skips_oversized_files(tmp_path: Path) -> None:
    images = [shown(tmp_path, 1, size=600), shown(tmp_path, 2, size=600), shown(tmp_path, 3, size=5000)]
    parts = plan_reply("", images, upload_limit=1000)
    assert [[f.filename for f in p.files] for p in parts] == [["shoebox-1.jpg"], ["shoebox-2.jpg"]]
    # The oversized one still gets its card (with the jump link), just without the picture.
    last_card = parts[-1].embeds[-1]
    assert last_card.footer.text.startswith("Image #3") and not last_card.image.url


def test_without_cards_each_photo_is_a_line_and_the_pictures_still_ride_along(tmp_path: Path) -> None:
    images = [shown(tmp_path, i, size=600 if i < 12 else 7000) for i in range(13)]
    parts = plan_reply("Lots.", images, upload_limit=6000, cards=False)
    assert all(p.embeds == [] for p in parts)
    assert [len(p.files) for p in parts] == [10, 2]  # 10 per message; #12 is over the limit
    assert parts[0].content is not None and parts[0].content.startswith("Lots.\n\nImage #0 \u00b7 #general")
    lines = parts[0].content.split("\n")[2:]
    assert lines[12] == "Image #12 \u00b7 #general \u00b7 posted by Ann \u00b7 https://discord.com/channels/1/2/12"
    assert len(lines) == 13 and parts[1].content is None


def test_a_missing_stored_copy_still_gets_a_card(tmp_path: Path) -> None:
    image = shown(tmp_path, 4)
    image.stored_copy.unlink()
    parts = plan_reply("One.", [image])
    assert parts[0].files == [] and len(parts[0].embeds) == 1


def test_embed_text_stays_under_the_per_message_total(tmp_path: Path) -> None:
    long = "y" * 4000
    images = [shown(tmp_path, i, channel="c" * 100, posted_text=long, author="a" * 1000) for i in range(10)]
    parts = plan_reply("x", images)
    assert len(parts) > 1
    for part in parts:
        assert sum(len(e) for e in part.embeds) <= EMBED_TOTAL_LIMIT


def test_long_answer_then_photos(tmp_path: Path) -> None:
    text = "\n\n".join("A paragraph about photos. " * 30 for _ in range(5))
    parts = plan_reply(text, [shown(tmp_path, 1)])
    assert len(parts) >= 2
    assert all(p.content and len(p.content) <= MESSAGE_LIMIT for p in parts)
    assert [len(p.files) for p in parts][-1] == 1 and all(not p.files for p in parts[:-1])
