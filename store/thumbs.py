"""Downscaled copies of every indexed image, stored by content hash.

Discord posts and vision models use these rather than the originals, which may be gone (a deleted
message, a moved file) or too big. Names are derived from the sha256 of the original bytes, so a
copy is written once however many times the image is posted, and a crash mid-write leaves at most
a `.tmp` file that `sweep` removes.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Callable

from store.atomic import write_atomically

THUMB_DIR = "thumbs"


class ThumbStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.root = data_dir / THUMB_DIR

    def relative_path(self, sha256: str, extension: str) -> str:
        return f"{THUMB_DIR}/{sha256[:2]}/{sha256}.{extension}"

    def absolute(self, relative: str) -> Path:
        return self.data_dir / relative

    def write_with(self, sha256: str, extension: str, fill: Callable[[BinaryIO], object]) -> str:
        """Let `fill` write the copy into a temp file, then fsync and rename it into place.

        Returns the path relative to the data dir. A copy that already exists is kept (the name
        is the content's hash), and a failed `fill` leaves nothing behind.
        """
        relative = self.relative_path(sha256, extension)
        target = self.absolute(relative)
        if target.exists():
            return relative
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, fill)
        return relative

    def delete(self, relative: str) -> None:
        try:
            self.absolute(relative).unlink()
        except FileNotFoundError:
            pass

    def all_relative(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {
            f"{THUMB_DIR}/{path.parent.name}/{path.name}"
            for path in self.root.glob("*/*")
            if path.is_file()
        }

    def sweep(self, keep: set[str]) -> int:
        """Remove copies (and stray temp files) that no catalog row refers to; returns how many."""
        removed = 0
        for relative in self.all_relative() - keep:
            self.delete(relative)
            removed += 1
        return removed
