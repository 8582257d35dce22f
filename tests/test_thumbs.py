"""Stored copies: written whole or not at all, named by content."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest

from store.thumbs import ThumbStore

SHA = "ab" + "0" * 62


def test_write_with_lands_the_file_under_its_hash(tmp_path: Path) -> None:
    store = ThumbStore(tmp_path)
    relative = store.write_with(SHA, "jpg", lambda handle: handle.write(b"pixels"))
    assert relative == f"thumbs/ab/{SHA}.jpg"
    assert store.absolute(relative).read_bytes() == b"pixels"
    assert store.all_relative() == {relative}


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    store = ThumbStore(tmp_path)

    def half_then_fail(handle: BinaryIO) -> None:
        handle.write(b"half a pict")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.write_with(SHA, "jpg", half_then_fail)
    assert store.all_relative() == set()
    assert not store.absolute(store.relative_path(SHA, "jpg")).exists()


def test_an_existing_copy_is_kept(tmp_path: Path) -> None:
    store = ThumbStore(tmp_path)
    store.write_with(SHA, "jpg", lambda handle: handle.write(b"first"))
    calls: list[int] = []
    store.write_with(SHA, "jpg", lambda handle: calls.append(1))
    assert calls == [] and store.absolute(store.relative_path(SHA, "jpg")).read_bytes() == b"first"
