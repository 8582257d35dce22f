"""Settings read from the environment (and an optional `.env` file), in one place.

Every knob Shoebox has is named here with its default, so `.env.example`, the README and the code
cannot drift apart silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
TINY_MODEL = "shoebox-tiny"


class SettingsError(ValueError):
    """A setting has a value Shoebox cannot use; the message names the variable."""


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = _env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass(frozen=True)
class ClipSettings:
    """Which CLIP model embeds images and text, and how it runs on the CPU."""

    model: str = DEFAULT_CLIP_MODEL
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    checkpoint: Path | None = None
    precision: str = "fp32"
    batch_size: int = 16
    threads: int = 0  # 0: let torch decide (all cores)

    @classmethod
    def from_env(cls) -> "ClipSettings":
        model = _env("SHOEBOX_CLIP_MODEL", DEFAULT_CLIP_MODEL)
        checkpoint_raw = _env("SHOEBOX_CLIP_CHECKPOINT", "")
        default_pretrained = DEFAULT_CLIP_PRETRAINED if model == DEFAULT_CLIP_MODEL else ""
        pretrained = _env("SHOEBOX_CLIP_PRETRAINED", default_pretrained) or None
        return cls(
            model=model,
            pretrained=None if checkpoint_raw else pretrained,
            checkpoint=Path(checkpoint_raw).expanduser() if checkpoint_raw else None,
            precision=_env_choice("SHOEBOX_CLIP_PRECISION", "fp32", ("fp32", "bf16")),
            batch_size=_env_int("SHOEBOX_CLIP_BATCH", 16, minimum=1),
            threads=_env_int("SHOEBOX_CLIP_THREADS", 0),
        )


@dataclass(frozen=True)
class IngestSettings:
    """Limits that keep a hostile or huge upload from hurting the process."""

    max_file_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 64_000_000
    thumb_max_side: int = 768

    @classmethod
    def from_env(cls) -> "IngestSettings":
        return cls(
            max_file_bytes=_env_int("SHOEBOX_MAX_FILE_MB", 50, minimum=1) * 1024 * 1024,
            max_pixels=_env_int("SHOEBOX_MAX_PIXELS", 64_000_000, minimum=1),
            thumb_max_side=_env_int("SHOEBOX_THUMB_SIDE", 768, minimum=64),
        )


@dataclass(frozen=True)
class Settings:
    """Everything the core needs; front ends (CLI, agent, bot) read their own extras."""

    data_dir: Path = field(default_factory=lambda: Path("shoebox-data"))
    clip: ClipSettings = field(default_factory=ClipSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)

    @classmethod
    def from_env(cls, data_dir: str | os.PathLike[str] | None = None) -> "Settings":
        chosen = data_dir if data_dir is not None else _env("SHOEBOX_DATA", "shoebox-data")
        return cls(
            data_dir=Path(chosen).expanduser(),
            clip=ClipSettings.from_env(),
            ingest=IngestSettings.from_env(),
        )


def load_dotenv(path: Path = Path(".env")) -> None:
    """Read `KEY=VALUE` lines from `.env` into the environment, never overriding real variables.

    A tiny reader instead of a dependency: the file format we document is the plain subset.
    """
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip().strip('"').strip("'")
        if key and key not in os.environ:
            os.environ[key] = value


__all__ = [
    "ClipSettings",
    "IngestSettings",
    "Settings",
    "SettingsError",
    "TINY_MODEL",
    "load_dotenv",
]
