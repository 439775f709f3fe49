"""Helpers shared by all config dataclasses (importable without torch).

Every field carries its documentation in ``metadata["doc"]``; use :func:`field`::

    @dataclass
    class ParallelConfig:
        tp: int = field(1, "Tensor-parallel size (ranks that split each layer).")
"""
from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message says which field and how to fix it."""


def field(default: Any = dataclasses.MISSING, doc: str = "", *, default_factory: Any = dataclasses.MISSING) -> Any:
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def field_docs(cls) -> dict[str, str]:
    """{field name: doc} for a config dataclass."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}
