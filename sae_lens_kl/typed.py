"""Checking a config dataclass's values against their type annotations, with one message per
field naming the value, its type and what it must be."""

from __future__ import annotations

from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def check_field_types(instance: Any) -> None:
    """Every field of a dataclass `instance` holds a value of its annotated type: ints are ints (not
    2.0 or True), bools are bools, lists are lists (a string is not a list of hooks). Literal
    fields pass here: their choices are checked by the caller, each with its own message."""
    for name, hint in get_type_hints(type(instance)).items():
        value = getattr(instance, name)
        if not _is_instance(value, hint):
            raise ValueError(
                f"{name}={value!r} ({type(value).__name__}) must be {_describe(hint)}; pass a value of "
                "that type."
            )


def _is_instance(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Union or type(hint).__name__ == "UnionType":
        return any(_is_instance(value, option) for option in get_args(hint))
    if origin is Literal:  # the choices are checked below, each with its own message
        return True
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_is_instance(element, item) for element in value)
    if hint is type(None):
        return value is None
    if hint is float:  # an int is a float; a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any, plural: bool = False) -> str:
    origin = get_origin(hint)
    if origin is Union or type(hint).__name__ == "UnionType":
        return " or ".join(_describe(option) for option in get_args(hint))
    if origin is list:
        return f"a list of {_describe(get_args(hint)[0], plural=True)}"
    if plural:
        return {int: "integers", float: "numbers", str: "strings"}.get(hint, hint.__name__)
    names = {int: "an integer", float: "a number", bool: "True or False", str: "a string", type(None): "None"}
    return names.get(hint, hint.__name__)
