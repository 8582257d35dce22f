"""A strict checker for the small part of JSON Schema that tool declarations use.

Arguments written by a language model are untrusted input. Checking them against the very schema
the model was shown keeps the declaration and the check from drifting apart, and turns a mistake
(an unknown field, a string where a number belongs, k = 500) into a short reason the model can read
and correct on its next step — instead of a half-understood call.

Supported: `type` object/string/integer/number/boolean, `properties`, `required`,
`additionalProperties: false`, `enum`, `minLength`, `maxLength`, `pattern`, `minimum`, `maximum`.
"""

from __future__ import annotations

import re
from typing import Any

from tools.search import ToolError


DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
PATTERN_HINTS = {DATE_PATTERN: "a date like 2024-07-31"}


class SchemaError(ToolError):
    """Arguments that do not match a tool's schema; the message says which field and why."""


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def _is_type(value: Any, expected: str) -> bool:
    if expected not in _TYPES:
        raise ValueError(f"unsupported schema type {expected!r}")
    if isinstance(value, bool) and expected != "boolean":
        return False  # JSON true is not the number 1
    return isinstance(value, _TYPES[expected])


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def validate(schema: dict[str, Any], value: Any, where: str = "arguments") -> None:
    """Raise `SchemaError` naming the first problem; return quietly when `value` fits."""
    expected = schema.get("type")
    if expected is not None and not _is_type(value, expected):
        raise SchemaError(f"{where} must be {_article(expected)}, not {_type_name(value)}")
    if "enum" in schema and value not in schema["enum"]:
        options = ", ".join(repr(v) for v in schema["enum"])
        raise SchemaError(f"{where} must be one of {options}")
    if isinstance(value, str):
        _check_string(schema, value, where)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(schema, value, where)
    elif isinstance(value, dict):
        _check_object(schema, value, where)


def _article(type_name: str) -> str:
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _check_string(schema: dict[str, Any], value: str, where: str) -> None:
    if "minLength" in schema and len(value.strip()) < schema["minLength"]:
        raise SchemaError(f"{where} must not be empty")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise SchemaError(f"{where} is too long (at most {schema['maxLength']} characters)")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        hint = PATTERN_HINTS.get(schema["pattern"], f"the pattern {schema['pattern']}")
        raise SchemaError(f"{where} must look like {hint}, not {value[:40]!r}")


def _check_number(schema: dict[str, Any], value: float, where: str) -> None:
    low, high = schema.get("minimum"), schema.get("maximum")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            raise SchemaError(f"{where} must be between {low} and {high}, not {value}")
        bound = f"at least {low}" if low is not None else f"at most {high}"
        raise SchemaError(f"{where} must be {bound}, not {value}")


def _check_object(schema: dict[str, Any], value: dict[str, Any], where: str) -> None:
    properties: dict[str, Any] = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(value) - set(properties))
        if unknown:
            allowed = ", ".join(properties) or "none"
            raise SchemaError(f"unknown field(s) {', '.join(unknown)}; the fields are: {allowed}")
    missing = [name for name in schema.get("required", []) if name not in value]
    if missing:
        raise SchemaError(f"missing required field(s): {', '.join(missing)}")
    for name, sub in properties.items():
        if name in value:
            validate(sub, value[name], name if where == "arguments" else f"{where}.{name}")


def check_declaration(schema: dict[str, Any]) -> None:
    """A declaration fit to show a model: an object, every property described, `required` listed."""
    if schema.get("type") != "object" or "required" not in schema:
        raise ValueError("a tool's input_schema must be an object that lists `required`")
    for name, sub in schema.get("properties", {}).items():
        if not str(sub.get("description", "")).strip():
            raise ValueError(f"property {name!r} has no description")
        if sub.get("type") not in _TYPES:
            raise ValueError(f"property {name!r} has an unsupported type {sub.get('type')!r}")
    for name in schema["required"]:
        if name not in schema.get("properties", {}):
            raise ValueError(f"required property {name!r} is not declared")


__all__ = ["DATE_PATTERN", "SchemaError", "check_declaration", "validate"]
