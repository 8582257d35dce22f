"""The Messages API's documented rules for a request body, checked by the fake server.

The real service answers a request that breaks one of these with 400 `invalid_request_error`;
a fake that accepted anything would let such a request pass every test and fail only in
production. So the fake checks each body it receives against these rules, refuses it as the
service would, and keeps the problems for the test to fail on.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from PIL import Image

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
MAX_IMAGE_BASE64 = 5 * 1024 * 1024
MAX_IMAGE_SIDE = 8000
MAX_IMAGES = 100
TOOL_CHOICES = {"auto", "any", "tool", "none"}
USER_BLOCKS = frozenset({"text", "image", "tool_result", "document"})
ASSISTANT_BLOCKS = frozenset({"text", "tool_use", "thinking", "redacted_thinking"})
RESULT_BLOCKS = frozenset({"text", "image"})


def request_problems(body: Any) -> list[str]:
    """Every rule `body` breaks, as short sentences; empty when the service would accept it."""
    if not isinstance(body, dict):
        return ["the body is not a JSON object"]
    problems: list[str] = []
    if not isinstance(body.get("model"), str) or not body["model"]:
        problems.append("model is missing")
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        problems.append("max_tokens must be a positive integer")
    problems += _tool_problems(body.get("tools", []), body.get("tool_choice"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return problems + ["messages must be a non-empty list"]
    if messages[0].get("role") != "user":
        problems.append("the first message must come from the user")
    if messages[-1].get("role") != "user":
        problems.append("the last message must come from the user (newer models refuse a prefilled answer)")
    images = 0
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        previous = messages[index - 1] if index else None
        problems += _pairing_problems(message, previous, where)
        allowed = USER_BLOCKS if message.get("role") == "user" else ASSISTANT_BLOCKS
        for block, block_where, kinds in _blocks(message, where, allowed):
            problems += _block_problems(block, kinds, block_where)
            images += block.get("type") == "image"
    if images > MAX_IMAGES:
        problems.append(f"{images} images in one request (at most {MAX_IMAGES})")
    return problems


def _tool_problems(tools: Any, choice: Any) -> list[str]:
    problems = []
    for number, tool in enumerate(tools):
        if not TOOL_NAME.match(str(tool.get("name", ""))):
            problems.append(f"tools.{number}.name does not match {TOOL_NAME.pattern}")
        if tool.get("input_schema", {}).get("type") != "object":
            problems.append(f"tools.{number}.input_schema must be of type object")
    if choice is not None and choice.get("type") not in TOOL_CHOICES:
        problems.append(f"tool_choice.type {choice.get('type')!r} is not one of {sorted(TOOL_CHOICES)}")
    return problems


def _blocks(
    message: dict[str, Any], where: str, allowed: frozenset[str]
) -> list[tuple[dict[str, Any], str, frozenset[str]]]:
    """The message's content blocks (a string is one text block), each with where it is and the
    kinds of block allowed there; the blocks inside a tool result follow it."""
    content = message.get("content")
    if isinstance(content, str):
        return [({"type": "text", "text": content}, f"{where}.content", allowed)]
    found = []
    for number, block in enumerate(content or []):
        found.append((block, f"{where}.content.{number}", allowed))
        inner = block.get("content") if block.get("type") == "tool_result" else None
        for inner_number, inner_block in enumerate(inner if isinstance(inner, list) else []):
            found.append((inner_block, f"{where}.content.{number}.content.{inner_number}", RESULT_BLOCKS))
    return found


def _pairing_problems(message: dict[str, Any], previous: dict[str, Any] | None, where: str) -> list[str]:
    """Each `tool_use` must be answered, first thing, in the very next user message."""
    content = message.get("content")
    if not isinstance(content, (str, list)) or not content:
        return [f"{where}: content must be a non-empty string or list"]
    blocks = content if isinstance(content, list) else []
    results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
    previous_blocks = previous.get("content") if previous else None
    uses = [
        b.get("id")
        for b in (previous_blocks if isinstance(previous_blocks, list) else [])
        if b.get("type") == "tool_use"
    ]
    problems = []
    if message.get("role") == "user" and sorted(map(str, results)) != sorted(map(str, uses)):
        problems.append(f"{where}: tool_result ids {results} do not answer the tool_use ids {uses} before them")
    if results and any(b.get("type") != "tool_result" for b in blocks[: len(results)]):
        problems.append(f"{where}: tool_result blocks must come before any other content")
    return problems


def _block_problems(block: dict[str, Any], allowed: frozenset[str], where: str) -> list[str]:
    kind = block.get("type")
    if kind not in allowed:
        return [f"{where}: a {kind!r} block is not allowed here"]
    if kind == "text" and (not isinstance(block.get("text"), str) or not block["text"].strip()):
        return [f"{where}: text content blocks must contain non-whitespace text"]
    if kind == "image":
        return _image_problems(block.get("source") or {}, where)
    return []


def _image_problems(source: dict[str, Any], where: str) -> list[str]:
    if source.get("type") != "base64":
        return []
    data = source.get("data", "")
    if len(data) > MAX_IMAGE_BASE64:
        return [f"{where}: image exceeds 5 MB maximum ({len(data)} bytes of base64)"]
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
            width, height = image.size
            actual = MEDIA_TYPES.get(image.format or "")
    except (binascii.Error, OSError, ValueError):
        return [f"{where}: the image data cannot be read"]
    problems = []
    if source.get("media_type") != actual:
        problems.append(f"{where}: media_type {source.get('media_type')!r}, but the data is {actual}")
    if max(width, height) > MAX_IMAGE_SIDE:
        problems.append(f"{where}: image dimensions exceed {MAX_IMAGE_SIDE} px ({width}x{height})")
    return problems
