"""The tools a language model may call, declared once: name, description, schema and function.

Each `Tool` pairs the JSON-schema declaration a model reads with the async function that runs it,
so adding a tool is one entry in `TOOLS`. `ToolRegistry.call` is the only way in: it rejects
unknown names, checks the arguments strictly against the declared schema, and hands the function
a `ToolContext` carrying what the *caller* decided — the asker's scope and this turn's attached
images. No schema has a scope field: what the asker may see is never the model's to choose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from store.library import Library
from tools.schemas import DATE_PATTERN, SchemaError, check_declaration, validate
from tools.search import (
    DEFAULT_K,
    MAX_K,
    MAX_QUERY_CHARS,
    Filters,
    Scope,
    ToolError,
    find_similar,
    get_description,
    search_images,
)


@dataclass(frozen=True)
class ToolContext:
    """What a call may use besides its arguments, bound by the caller for the whole turn."""

    scope: Scope
    attachments: tuple[bytes, ...] = ()  # images attached to the message being answered


@dataclass
class ToolOutput:
    """A tool's answer: JSON-ready `data` for the model, plus the image ids in it, best first.

    `ranked` marks a result list (search, look-alikes): its top entries are what a reply shows
    when the model cites nothing.
    """

    data: Any
    image_ids: list[int] = field(default_factory=list)
    ranked: bool = False


ToolFunction = Callable[[Library, dict[str, Any], ToolContext], Awaitable[ToolOutput]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    run: ToolFunction

    def definition(self) -> dict[str, Any]:
        """The declaration as the Messages API takes it."""
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema}


class UnknownTool(ToolError):
    """The model asked for a tool that does not exist."""


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool]) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise ValueError(f"two tools are called {tool.name!r}")
            check_declaration(tool.input_schema)
            self._tools[tool.name] = tool

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def definitions(self) -> list[dict[str, Any]]:
        return [tool.definition() for tool in self._tools.values()]

    async def call(
        self, library: Library, name: str, arguments: Any, context: ToolContext
    ) -> ToolOutput:
        """Run one call; raises `ToolError` (or a subclass) with a short reason when it cannot."""
        tool = self._tools.get(name)
        if tool is None:
            raise UnknownTool(f"there is no tool called {name!r}; the tools are {', '.join(self._tools)}")
        if not isinstance(arguments, dict):
            raise SchemaError("arguments must be a JSON object")
        validate(tool.input_schema, arguments)
        return await tool.run(library, arguments, context)


# ---- the declarations -------------------------------------------------------------------------

MAX_IMAGE_ID = 2**53 - 1  # the largest integer JSON carries exactly (and SQLite stores)

_K = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_K,
    "description": f"How many results to return, 1-{MAX_K} (default {DEFAULT_K}). "
    "Ask for more only when the user wants many photos.",
}

_FILTERS: dict[str, Any] = {
    "author": {
        "type": "string",
        "maxLength": 100,
        "description": "Only images posted by this person: their Discord name as people write it "
        "(case does not matter, no '@'), or a numeric user id. Leave out when no poster is named.",
    },
    "channel": {
        "type": "string",
        "maxLength": 100,
        "description": "Only images posted in this Discord channel: its name without '#', or its "
        "numeric id. Leave out unless the user names a channel.",
    },
    "after": {
        "type": "string",
        "pattern": DATE_PATTERN,
        "description": "Only images posted on or after this day, YYYY-MM-DD (UTC). Turn relative "
        "times ('last summer', 'in March', 'last week') into a range using today's date.",
    },
    "before": {
        "type": "string",
        "pattern": DATE_PATTERN,
        "description": "Only images posted on or before this day (the day itself included), YYYY-MM-DD.",
    },
    "sort": {
        "type": "string",
        "enum": ["relevance", "newest", "oldest"],
        "description": "Order of the results: relevance (default: best visual match first), or "
        "newest / oldest by posting time, for 'the latest photo of ...' or 'the first ...'.",
    },
}


def _filters(arguments: dict[str, Any]) -> Filters:
    return Filters(
        author=arguments.get("author"),
        channel=arguments.get("channel"),
        after=arguments.get("after"),
        before=arguments.get("before"),
        sort=arguments.get("sort", "relevance"),
    )


def _listing(results: list[dict[str, Any]]) -> ToolOutput:
    return ToolOutput(
        {"count": len(results), "results": results}, [int(r["id"]) for r in results], ranked=True
    )


async def _search(library: Library, arguments: dict[str, Any], context: ToolContext) -> ToolOutput:
    results = await search_images(
        library,
        arguments["query"],
        k=arguments.get("k", DEFAULT_K),
        scope=context.scope,
        filters=_filters(arguments),
    )
    return _listing(results)


async def _similar(library: Library, arguments: dict[str, Any], context: ToolContext) -> ToolOutput:
    has_attachment, has_id = "attachment" in arguments, "image_id" in arguments
    if has_attachment == has_id:
        raise ToolError("give exactly one of attachment or image_id")
    target: bytes | int
    if has_attachment:
        number = arguments["attachment"]
        if not context.attachments:
            raise ToolError("no image is attached to this message; use image_id instead")
        if number >= len(context.attachments):
            raise ToolError(
                f"there is no attachment {number}: this message has {len(context.attachments)} "
                f"attached image(s), numbered from 0"
            )
        target = context.attachments[number]
    else:
        target = int(arguments["image_id"])
    results = await find_similar(
        library, target, k=arguments.get("k", DEFAULT_K), scope=context.scope, filters=_filters(arguments)
    )
    return _listing(results)


async def _describe(library: Library, arguments: dict[str, Any], context: ToolContext) -> ToolOutput:
    info = await get_description(library, arguments["image_id"], scope=context.scope)
    info.pop("stored_copy", None)  # a path on this machine: of no use to a model
    return ToolOutput(info, [int(info["id"])])


SEARCH_IMAGES = Tool(
    name="search_images",
    description=(
        "Search the photo library by what the images show. Use it whenever the user wants to find, "
        "see or count photos, or asks whether a photo of something exists. The query is matched by "
        "a CLIP image-text model (plus stored descriptions and posted text), which works best with "
        "a short English visual description of the picture: 'a dog on a beach', 'a birthday cake "
        "with candles'. Translate other languages to English, drop words like 'photo of', and move "
        "who posted it, the channel and the time into the author, channel, after and before "
        "filters. Example: 'la foto del perro de Ana del verano pasado' becomes query 'a dog', "
        "author 'Ana', after and before spanning last summer. Results come best first, each with "
        "an id, a score (CLIP similarity: higher is closer, comparable only within one search), "
        "where and when it was posted, and a description when one is known; the top images are "
        "attached so you can look at them. If nothing fits, try once more with other words or "
        "fewer filters."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_QUERY_CHARS,
                "description": "A short English description of what is visible in the wanted image, "
                "e.g. 'a red car in the snow'. No names of posters, channels or dates here.",
            },
            "k": _K,
            **_FILTERS,
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    run=_search,
)

FIND_SIMILAR = Tool(
    name="find_similar",
    description=(
        "Find images that look like a given image: either an image the user attached to this "
        "message (attachment, numbered from 0 in the order they are attached) or an image already "
        "in the library (image_id, from an earlier result). Use it when the user attaches a photo "
        "and asks for similar ones, the same one, or where it was posted, or asks for 'more like "
        "#12'. Give exactly one of attachment or image_id. Takes the same filters as search_images."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "attachment": {
                "type": "integer",
                "minimum": 0,
                "maximum": 9,
                "description": "Which image attached to the user's current message to match: 0 for "
                "the first. Only when the message has attachments.",
            },
            "image_id": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_IMAGE_ID,
                "description": "The id of a library image to match, as given in an earlier result.",
            },
            "k": _K,
            **_FILTERS,
        },
        "required": [],
        "additionalProperties": False,
    },
    run=_similar,
)

GET_DESCRIPTION = Tool(
    name="get_description",
    description=(
        "Read everything stored about one image: its full description, the text posted with it, "
        "every place and time it was posted, and its size. Use it to answer questions about a "
        "specific result (who posted it, when, what the caption says) or before stating details "
        "you cannot make out in the small preview. Only images the user may see can be read."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "image_id": {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_IMAGE_ID,
                "description": "The id of the image, as given in a search or look-alike result.",
            },
        },
        "required": ["image_id"],
        "additionalProperties": False,
    },
    run=_describe,
)

TOOLS = ToolRegistry([SEARCH_IMAGES, FIND_SIMILAR, GET_DESCRIPTION])


__all__ = [
    "FIND_SIMILAR",
    "GET_DESCRIPTION",
    "SEARCH_IMAGES",
    "TOOLS",
    "Tool",
    "ToolContext",
    "ToolOutput",
    "ToolRegistry",
    "UnknownTool",
]
