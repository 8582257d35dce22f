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


def env_text(name: str) -> str | None:
    """The variable's value, stripped; None when unset or blank (a blank line in .env means unset)."""
    value = os.environ.get(name)
    return value.strip() if value and value.strip() else None


def env_int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = env_text(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise SettingsError(f"{name} must be {bound}, got {value}")
    return value


def env_float(name: str, default: float, minimum: float) -> float:
    raw = env_text(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {raw}")
    return value


def env_switch(name: str, default: bool) -> bool:
    raw = (env_text(name) or ("on" if default else "off")).lower()
    if raw in {"on", "true", "1", "yes"}:
        return True
    if raw in {"off", "false", "0", "no"}:
        return False
    raise SettingsError(f"{name} must be on or off, got {raw!r}")


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (env_text(name) or default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass(frozen=True)
class ClipSettings:
    """Which CLIP model embeds images and text, and how it runs on the CPU."""

    model: str = DEFAULT_CLIP_MODEL
    pretrained: str | None = DEFAULT_CLIP_PRETRAINED
    checkpoint: Path | None = None
    precision: str = "auto"  # auto: bf16 where the CPU does it natively and it agrees with fp32
    batch_size: int = 16
    threads: int = 0  # 0: let torch decide (all cores)

    @classmethod
    def from_env(cls) -> "ClipSettings":
        model = env_text("SHOEBOX_CLIP_MODEL") or DEFAULT_CLIP_MODEL
        checkpoint_raw = env_text("SHOEBOX_CLIP_CHECKPOINT") or ""
        default_pretrained = DEFAULT_CLIP_PRETRAINED if model == DEFAULT_CLIP_MODEL else ""
        pretrained = env_text("SHOEBOX_CLIP_PRETRAINED") or default_pretrained or None
        return cls(
            model=model,
            pretrained=None if checkpoint_raw else pretrained,
            checkpoint=Path(checkpoint_raw).expanduser() if checkpoint_raw else None,
            precision=env_choice("SHOEBOX_CLIP_PRECISION", "auto", ("auto", "fp32", "bf16")),
            batch_size=env_int("SHOEBOX_CLIP_BATCH", 16, minimum=1),
            threads=env_int("SHOEBOX_CLIP_THREADS", 0),
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
            max_file_bytes=env_int("SHOEBOX_MAX_FILE_MB", 50, minimum=1) * 1024 * 1024,
            max_pixels=env_int("SHOEBOX_MAX_PIXELS", 64_000_000, minimum=1),
            thumb_max_side=env_int("SHOEBOX_THUMB_SIDE", 768, minimum=64),
        )


@dataclass(frozen=True)
class Settings:
    """Everything the core needs; front ends (CLI, agent, bot) read their own extras."""

    data_dir: Path = field(default_factory=lambda: Path("shoebox-data"))
    clip: ClipSettings = field(default_factory=ClipSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)

    @classmethod
    def from_env(cls, data_dir: str | os.PathLike[str] | None = None) -> "Settings":
        chosen = data_dir if data_dir is not None else (env_text("SHOEBOX_DATA") or "shoebox-data")
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
    "env_choice",
    "env_float",
    "env_int",
    "env_switch",
    "env_text",
    "IngestSettings",
    "Settings",
    "SettingsError",
    "TINY_MODEL",
    "load_dotenv",
]
