"""Talking to Claude: the settings, the client, and one retry policy for every request.

Everything that calls the Messages API (the agent, the captioner) goes through `create_message`,
so they share one behaviour under load: 429, 529, 5xx, timeouts and dropped connections are retried
with backoff, a `retry-after` from the service is honoured, and the total time spent waiting is
bounded by `max_wait` — a service that asks for a longer pause than that gets an honest "try again
later" instead of a reply that never comes. The SDK's own retry loop is switched off
(`max_retries=0`) because it honours any `retry-after` without a bound; two retry layers would also
multiply attempts.

Every failure leaves here as an `LLMError` whose text is one sentence a person can act on.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
from anthropic.types import Message
from PIL import Image

from store.settings import env_float, env_int, env_switch, env_text

log = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-sonnet-5-5"  # the newest Sonnet the installed SDK lists; 4-5 is deprecated
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 8.0


# ---- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSettings:
    """Everything about Claude in one place: the key, the model, limits, retries, captions.

    `api_key=None` means offline mode: the same entry points answer with direct search.
    """

    api_key: str | None = None
    base_url: str | None = None  # None: the SDK's default, https://api.anthropic.com
    model: str = DEFAULT_MODEL
    max_tokens: int = 1024
    timeout: float = 60.0  # seconds for one request
    retries: int = 2  # extra attempts after a retryable failure
    max_wait: float = 30.0  # seconds spent waiting between attempts, in total, per request
    max_steps: int = 4  # model calls that may use tools in one answer
    answer_timeout: float = 120.0  # seconds for a whole answer, all steps and retries included
    images_per_result: int = 3  # stored copies shown to Claude per tool result
    image_side: int = 384  # longest side of those copies, in pixels
    captions: bool = False
    captions_per_minute: int = 20

    @property
    def online(self) -> bool:
        return self.api_key is not None

    @classmethod
    def from_env(cls) -> "AgentSettings":
        return cls(
            api_key=env_text("ANTHROPIC_API_KEY"),
            base_url=env_text("ANTHROPIC_BASE_URL"),
            model=env_text("SHOEBOX_CLAUDE_MODEL") or DEFAULT_MODEL,
            max_tokens=env_int("SHOEBOX_MAX_TOKENS", 1024, 64, 64_000),
            timeout=env_float("SHOEBOX_LLM_TIMEOUT", 60.0, 0.1),
            retries=env_int("SHOEBOX_LLM_RETRIES", 2, 0, 10),
            max_wait=env_float("SHOEBOX_LLM_MAX_WAIT", 30.0, 0.0),
            max_steps=env_int("SHOEBOX_AGENT_MAX_STEPS", 4, 1, 20),
            answer_timeout=env_float("SHOEBOX_AGENT_TIMEOUT", 120.0, 1.0),
            images_per_result=env_int("SHOEBOX_AGENT_IMAGES", 3, 0, 10),
            captions=env_switch("SHOEBOX_CAPTIONS", False),
            captions_per_minute=env_int("SHOEBOX_CAPTIONS_PER_MINUTE", 20, 1, 10_000),
        )


def make_client(settings: AgentSettings) -> anthropic.AsyncAnthropic | None:
    """The client for these settings, or None without a key (offline mode).

    The key and base URL are passed explicitly, so what `AgentSettings` says is what is used,
    whatever else the environment or a profile on disk holds.
    """
    if settings.api_key is None:
        return None
    return anthropic.AsyncAnthropic(
        api_key=settings.api_key,
        base_url=settings.base_url,
        timeout=settings.timeout,
        max_retries=0,
    )


# ---- image content ----------------------------------------------------------------------------

JPEG_QUALITY = 80


def image_block(image: Image.Image, max_side: int) -> dict[str, Any]:
    """An image content block: RGB, longest side at most `max_side`, JPEG, base64.

    Re-encoding small is what bounds the tokens an image costs (about width x height / 750).
    CPU work: call it from a worker thread.
    """
    picture = image.convert("RGB")
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/jpeg",
            "data": base64.b64encode(buffer.getvalue()).decode("ascii"),
        },
    }


def stored_copy_block(path: Path, max_side: int) -> dict[str, Any] | None:
    """The block for a stored downscaled copy, or None when it cannot be read (thread-safe)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image_block(image, max_side)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("Cannot read stored copy %s: %s", path, error)
        return None


# ---- errors -----------------------------------------------------------------------------------


class LLMError(RuntimeError):
    """Claude could not answer. `str(error)` is one sentence for the user; `kind` is for code."""

    def __init__(self, kind: str, sentence: str) -> None:
        super().__init__(sentence)
        self.kind = kind  # auth | denied | model | billing | rejected | busy | unreachable | bad_response
        self.sentence = sentence


def explain(error: BaseException, settings: AgentSettings) -> LLMError:
    """Turn whatever the SDK raised into one sentence a person can act on."""
    if isinstance(error, LLMError):
        return error
    if isinstance(error, anthropic.AuthenticationError):
        return LLMError(
            "auth", "Claude rejected the API key: check ANTHROPIC_API_KEY (it is missing, mistyped or revoked)."
        )
    if isinstance(error, anthropic.PermissionDeniedError):
        return LLMError(
            "denied", f"The key in ANTHROPIC_API_KEY may not use the model {settings.model}."
        )
    if isinstance(error, anthropic.NotFoundError):
        return LLMError(
            "model", f"Claude has no model called {settings.model!r}: check SHOEBOX_CLAUDE_MODEL."
        )
    if isinstance(error, anthropic.APIStatusError) and _is_billing(error):
        return LLMError(
            "billing",
            "The Anthropic account behind ANTHROPIC_API_KEY is out of credit or over its spend "
            "limit: add credit or raise the limit in the Anthropic Console, then try again.",
        )
    if isinstance(error, anthropic.RateLimitError):
        when = _when(retry_after(error), "in a minute")
        return LLMError("busy", f"Claude is rate-limiting this API key right now; try again {when}.")
    if isinstance(error, anthropic.APIStatusError) and error.status_code >= 500:
        when = _when(retry_after(error), "in a few minutes")
        return LLMError("busy", f"Claude is overloaded or unavailable right now; try again {when}.")
    if isinstance(error, anthropic.APIStatusError):
        reason = (error.api_message or "").strip().rstrip(".")[:200]
        detail = f": {reason}" if reason else ""
        return LLMError("rejected", f"Claude refused the request (HTTP {error.status_code}{detail}).")
    if isinstance(error, anthropic.APITimeoutError):
        return LLMError(
            "unreachable",
            f"Claude did not answer within {settings.timeout:g} second{'' if settings.timeout == 1 else 's'}; try again later.",
        )
    if isinstance(error, anthropic.APIConnectionError):
        where = settings.base_url or "api.anthropic.com"
        return LLMError("unreachable", f"Could not reach Claude at {where}; check the network or ANTHROPIC_BASE_URL.")
    return LLMError("bad_response", "Claude's service sent a reply Shoebox could not read; try again.")


def _when(seconds: float | None, otherwise: str) -> str:
    """When to try again, in words: `otherwise`, unless the service asked for a longer pause."""
    if seconds is None or seconds <= 60:
        return otherwise
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"in about {minutes} minutes"
    return f"in about {round(minutes / 60)} hours"


def _is_billing(error: anthropic.APIStatusError) -> bool:
    """Whether the account, not the request, is at fault: no credit left, or a spend limit.

    The service says so with 402 or a `billing_error`, and also as a plain 400 whose message
    speaks of the credit balance, which only its wording tells apart from a bad request.
    """
    if error.status_code == 402 or error.type == "billing_error":
        return True
    return "credit balance" in (error.api_message or "").lower()


# ---- the retry policy -------------------------------------------------------------------------


def retry_after(error: BaseException) -> float | None:
    """Seconds the service asked us to wait (`retry-after-ms`, `retry-after` seconds or date)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        parsed = email.utils.parsedate_tz(raw)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, anthropic.APIConnectionError):  # includes timeouts
        return True
    if isinstance(error, anthropic.APIStatusError):
        verdict = error.response.headers.get("x-should-retry")
        if verdict in ("true", "false"):
            return verdict == "true"
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    return False


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: about 0.5 s, 1 s, 2 s ... never over 8 s."""
    return min(INITIAL_BACKOFF * 2**attempt, MAX_BACKOFF) * (1 - 0.25 * random.random())


def check_message(response: object) -> Message:
    """A reply that is not a Messages API message (HTML from a proxy, a wrong shape) is an error."""
    content = getattr(response, "content", None)
    if not isinstance(response, Message) or not isinstance(content, list):
        raise LLMError("bad_response", "Claude's service sent a reply Shoebox could not read; try again.")
    if not all(_readable(block) for block in content):
        raise LLMError("bad_response", "Claude's service sent a reply Shoebox could not read; try again.")
    return response


def _readable(block: object) -> bool:
    kind = getattr(block, "type", None)
    if kind == "text":
        return isinstance(getattr(block, "text", None), str)
    if kind == "tool_use":
        return isinstance(getattr(block, "id", None), str) and isinstance(getattr(block, "name", None), str)
    return isinstance(kind, str)


async def create_message(
    client: anthropic.AsyncAnthropic, settings: AgentSettings, **params: Any
) -> Message:
    """`client.messages.create(**params)` under the retry policy; raises `LLMError` on failure.

    Total time is bounded: at most `retries + 1` attempts of at most `timeout` seconds each, plus
    at most `max_wait` seconds of waiting between them.
    """
    waited = 0.0
    attempt = 0
    while True:
        try:
            response = await client.messages.create(**params)
            return check_message(response)
        except LLMError:
            raise
        except Exception as error:  # the SDK raises its own tree, plus ValueError on broken JSON
            if not is_retryable(error) or attempt >= settings.retries:
                if is_retryable(error):
                    log.warning("Claude still failing after %d attempt(s): %s", attempt + 1, error)
                raise explain(error, settings) from error
            asked = retry_after(error)
            delay = asked if asked is not None else backoff(attempt)
            if waited + delay > settings.max_wait:
                log.warning("Claude asked for a %.1fs pause; over the wait budget, giving up", delay)
                raise explain(error, settings) from error
            log.info("Claude request failed (%s); retry %d in %.1fs", error, attempt + 1, delay)
            await asyncio.sleep(delay)
            waited += delay
            attempt += 1


__all__ = [
    "AgentSettings",
    "DEFAULT_MODEL",
    "LLMError",
    "create_message",
    "explain",
    "image_block",
    "make_client",
    "stored_copy_block",
]
