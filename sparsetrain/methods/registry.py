"""The method registry: name -> `Method` object. Every list of methods is read from here."""

from __future__ import annotations

from typing import Dict, Tuple

from ..ops.nm import fmt_choices
from .base import Method

__all__ = ["register", "unregister", "get", "names", "all_methods"]

_METHODS: Dict[str, Method] = {}


def register(method):
    """Register a `Method` (an instance, or a class, which is instantiated); returns it unchanged,
    so it works as a class decorator. A second method under a taken name is an error."""
    obj = method() if isinstance(method, type) else method
    if not isinstance(obj, Method):
        raise TypeError(f"`method` must be a sparsetrain.methods.Method, got {type(obj).__name__}")
    if not obj.name:
        raise ValueError(f"{type(obj).__name__} has no `name`")
    if obj.name in _METHODS and type(_METHODS[obj.name]) is not type(obj):
        raise ValueError(f"A method named {obj.name!r} is registered already ({type(_METHODS[obj.name]).__name__})")
    _METHODS[obj.name] = obj
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests and plugins that register one for a while)."""
    _METHODS.pop(name, None)


def get(name: str) -> Method:
    """The method registered as ``name``; a `ValueError` listing the valid names otherwise."""
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown `method`={name!r}; valid choices: {fmt_choices(names())}") from None


def names() -> Tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_METHODS)


def all_methods() -> Tuple[Method, ...]:
    return tuple(_METHODS.values())
