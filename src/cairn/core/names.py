"""Validation of user-given names and values, with messages that say what is allowed."""

from __future__ import annotations

import re
from typing import Any

from cairn.core.errors import UserInputError

_DATA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,254}$")


def check_type(value: Any, types: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        allowed = ", ".join(t.__name__ for t in _as_tuple(types))
        raise UserInputError(f"{what} must be of type {allowed}, not {type(value).__name__} ({value!r})")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def check_data_name(name: Any, what: str) -> str:
    check_type(name, str, what)
    if not _DATA_NAME.fullmatch(name) or len(name) > 255:
        raise UserInputError(f"{what} {name!r} is not valid: use 1 to 255 letters, digits and underscores, "
                             f"starting with a letter or underscore (e.g. 'prepped_data')")
    return name


_COMPUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,254}$")


def _check_name(name: Any, what: str, pattern: re.Pattern[str], allowed: str) -> str:
    check_type(name, str, what)
    if not pattern.fullmatch(name):
        raise UserInputError(f"{what} {name!r} is not valid: use {allowed}")
    return name


def check_compute_name(name: Any) -> str:
    """A compute target's name: as Azure ML's ("cpu-cluster"), '-' allowed."""
    return _check_name(name, "compute target name", _COMPUTE_NAME,
                       "1 to 255 letters, digits, '-' and '_', starting with a letter (e.g. 'cpu-cluster')")


def check_experiment_name(name: Any) -> str:
    return _check_name(name, "experiment name", _EXPERIMENT_NAME,
                       "1 to 255 letters, digits, '-' and '_', starting with a letter or digit")


def check_step_name(name: Any) -> str:
    check_type(name, str, "step name")
    if not name.strip() or len(name) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UserInputError(f"step name {name!r} is not valid: use 1 to 255 characters, none of them "
                             f"control characters")
    return name


def variable_problems(variables: dict[Any, Any], where: str) -> list[str]:
    """What no process could be started with: a variable named empty, with '=' or a NUL byte, or
    a value with a NUL byte (names and values are given to the step as text)."""
    problems = []
    for key, value in variables.items():
        name = str(key)
        if not name or "=" in name or "\0" in name:
            problems.append(f"{where}: environment variable name {name!r} is not valid (it must be non-empty, "
                            f"without '=' or NUL characters)")
        elif "\0" in str(value):
            problems.append(f"{where}: the value of environment variable {name!r} has a NUL character, which no "
                            f"process can be given")
    return problems


def check_environment_name(name: Any) -> str:
    """An environment's name: any printable text up to 255 characters (shown in tables and errors)."""
    check_type(name, str, "Environment name")
    if not name.strip():
        raise UserInputError("Environment name must not be empty")
    if len(name) > 255 or not name.isprintable():
        raise UserInputError(f"Environment name {name!r} is not valid: use up to 255 printable characters (no "
                             f"line breaks, tabs or other control characters)")
    return name
