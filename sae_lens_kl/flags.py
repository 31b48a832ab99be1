"""Command-line flags from dataclasses, and option values from a YAML/JSON file.

A command's options are small dataclasses whose fields say everything once: name, type (int,
float, str, bool, `X | None`, a `Literal` of choices, `list[X]`), default and, in the docstring
under the field, the help. `add_flags` turns them into argparse flags (help: the docstring and the
default); a field's `metadata` asks for what a plain annotation cannot say: `parse` (a type
function, e.g. `positive_int`), `comma` (a comma-separated list), `repeat` (a flag given several
times), `positional`, `aliases`. Docstrings are read by simple-parsing. This module imports
nothing heavy, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any

from simple_parsing.docstring import get_attribute_docstring


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (simple-parsing reads them from the source)."""
    return {
        f.name: " ".join(get_attribute_docstring(cls, f.name).docstring_below.split()) for f in fields(cls)
    }


def flag_type(annotation: Any) -> tuple[Any, list[str] | None, str | None]:
    """argparse type, choices and nargs of a field annotation: X, X | None, list[X], or a Literal
    of strings."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation)), None
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], None, "+"
    return annotation, None, None


def comma_list(kind: type) -> Callable[[str], list[Any]]:
    """An argparse type: comma-separated values of `kind`."""

    def parse_list(text: str) -> list[Any]:
        try:
            return [kind(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}s"
            ) from None

    return parse_list


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
    exclude: tuple[str, ...] = (),
    negatable: bool = False,
) -> None:
    """One flag per field of the dataclass `cls` (except `exclude`). `defaults` and `helps`
    replace a field's default or help text where a command gives it another value or meaning.
    A bool field is a switch (`--x`), or with `negatable` or a True default `--x/--no-x`."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in fields(cls):
        if field.name not in exclude:
            doc, annotation = docs[field.name], hints[field.name]
            _add_flag(parser, field, annotation, doc, defaults or {}, helps or {}, negatable)


def _add_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    field: Field[Any],
    annotation: Any,
    doc: str,
    defaults: Mapping[str, Any],
    helps: Mapping[str, str],
    negatable: bool,
) -> None:
    kind, choices, nargs = flag_type(annotation)
    meta = field.metadata
    declared = field.default_factory() if field.default_factory is not MISSING else field.default
    default = defaults.get(field.name, None if declared is MISSING else declared)
    shown = ",".join(map(str, default)) if isinstance(default, list) and meta.get("comma") else default
    # the default is shown unless the docstring says what it is (or there is none to show)
    silent = "default" in doc.lower() or default is None or default is False or meta.get("positional")
    help_text = (helps.get(field.name) or (doc if silent else f"{doc} (default: {shown})")).replace("%", "%%")
    if meta.get("positional"):
        parser.add_argument(field.name, choices=choices, help=help_text)
        return
    names = ["--" + field.name.replace("_", "-"), *meta.get("aliases", ())]
    if kind is bool:
        # a `bool | None` field keeps None ("decide from the SAE"), settable either way
        action = argparse.BooleanOptionalAction if default or default is None or negatable else "store_true"
        parser.add_argument(*names, action=action, default=default, help=help_text)
    elif meta.get("comma"):
        parser.add_argument(*names, type=comma_list(kind), default=default, help=help_text)
    elif meta.get("repeat"):
        parser.add_argument(*names, action="append", default=default, help=help_text)
    else:
        kind = meta.get("parse", kind)
        parser.add_argument(*names, type=kind, choices=choices, nargs=nargs, default=default, help=help_text)


def read_config_file(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """Option values from a YAML or JSON file; any problem is a usage error naming the file."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as error:
        parser.error(f"--config {path}: cannot read it ({error.strerror or error}).")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except ValueError as error:  # json.JSONDecodeError and yaml.YAMLError's parse errors
        parser.error(
            f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({error})."
        )
    except Exception as error:  # noqa: BLE001 (yaml.YAMLError is not a ValueError)
        parser.error(f"--config {path}: not valid YAML ({str(error).splitlines()[0]}).")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values.")
    return {key.replace("-", "_"): value for key, value in values.items()}


def config_value(action: argparse.Action, value: Any) -> Any:
    """A --config value checked as the flag's own parser would check it: a flag that takes a
    value gets it through the flag's type (an int flag refuses 2.5 and True), a switch takes
    True or False, a list flag a list."""
    name = action.dest
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # a switch
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {value!r} is not true or false")
        return value
    if value is None:
        return None
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise TypeError(f"{name}: {value!r} is not a list")
        return [_config_item(action, item) for item in value]
    return _config_item(action, value)


def _config_item(action: argparse.Action, value: Any) -> Any:
    kind = action.type or str
    if isinstance(value, (bool, list, dict)):
        raise TypeError(f"{action.dest}: {value!r} is not a {getattr(kind, '__name__', 'value')}")
    if kind is str and not isinstance(value, str):
        raise TypeError(f"{action.dest}: {value!r} is not a string")
    if kind is int and isinstance(value, float):
        raise TypeError(f"{action.dest}: {value!r} is not an integer")
    try:
        converted = kind(str(value)) if callable(kind) else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{action.dest}: {value!r} is not valid ({error})") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{action.dest}: {value!r} is not one of {list(action.choices)}")
    return converted
