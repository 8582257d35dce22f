"""The fake Messages API refuses what the real one refuses, so a bad request cannot pass a test."""

from __future__ import annotations

import base64
import copy
import io
from typing import Any, Callable

import anthropic
import pytest
from PIL import Image

from tests.fake_anthropic import FakeAnthropic, answer, fake_anthropic  # noqa: F401 - fixture
from tests.messages_rules import request_problems


def _image(size: tuple[int, int] = (8, 8), kind: str = "JPEG") -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, kind)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": data}}


def valid_body() -> dict[str, Any]:
    """A question, a tool call with text beside it, and its result holding a preview."""
    return {
        "model": "claude-test",
        "max_tokens": 100,
        "tools": [{"name": "search_images", "description": "d", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [_image(), {"type": "text", "text": "like this?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "search_images", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "one found"}, _image()],
                    }
                ],
            },
        ],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to the body: `path` is dotted keys and list indexes."""

    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = body
        for key in parents:
            target = target[int(key)] if key.isdigit() else target[key]
        target[int(last) if last.isdigit() else last] = value

    return change


BROKEN = {
    "blank text": (_set("messages.1.content.0.text", " \n"), "non-whitespace text"),
    "empty text in a tool result": (_set("messages.2.content.0.content.0.text", ""), "non-whitespace text"),
    "unanswered tool call": (_set("messages.2.content.0.tool_use_id", "toolu_2"), "do not answer"),
    "result after text": (
        _set("messages.2.content", [{"type": "text", "text": "x"}, {"type": "tool_result", "tool_use_id": "toolu_1"}]),
        "must come before",
    ),
    "prefill": (lambda body: body["messages"].append({"role": "assistant", "content": "Sure"}), "last message"),
    "assistant first": (_set("messages.0.role", "assistant"), "first message"),
    "bad tool name": (_set("tools.0.name", "search images"), "tools.0.name"),
    "schema not an object": (_set("tools.0.input_schema", {"type": "string"}), "type object"),
    "wrong media type": (_set("messages.0.content.0", _image(kind="PNG")), "but the data is image/png"),
    "too tall": (_set("messages.0.content.0", _image((4, 8001))), "exceed 8000"),
    "tool use in a user turn": (
        _set("messages.0.content.1", {"type": "tool_use", "id": "t", "name": "x", "input": {}}),
        "'tool_use' block is not allowed",
    ),
    "no max_tokens": (lambda body: body.pop("max_tokens"), "max_tokens"),
    "bad tool choice": (_set("tool_choice", {"type": "never"}), "tool_choice"),
    "over 100 images": (_set("messages.0.content", [_image()] * 100), "101 images in one request"),
}


def test_a_valid_body_breaks_no_rule() -> None:
    assert request_problems(valid_body()) == []


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_rule_is_named(name: str) -> None:
    change, words = BROKEN[name]
    body = copy.deepcopy(valid_body())
    change(body)
    problems = request_problems(body)
    assert problems and any(words in problem for problem in problems), problems


async def test_the_fake_refuses_a_broken_request_as_the_service_would(fake_anthropic: FakeAnthropic) -> None:  # noqa: F811
    fake_anthropic.script([answer("never sent")])
    body = valid_body()
    BROKEN["blank text"][0](body)
    async with anthropic.AsyncAnthropic(api_key="k", base_url=fake_anthropic.base_url, max_retries=0) as client:
        with pytest.raises(anthropic.BadRequestError, match="non-whitespace text"):
            await client.messages.create(**body)
    assert fake_anthropic.remaining == 1  # the script was not consumed
    assert fake_anthropic.violations and "non-whitespace" in fake_anthropic.violations[0]
    fake_anthropic.violations.clear()  # seen: the fixture would fail the test on it otherwise
