"""The data folders shipped inside the ``engine`` package: ``lua`` and ``migrations``.

Installed from a wheel they are the subpackages ``engine.lua`` and so on (pyproject's
``package-dir``). Run from a source checkout they are the top-level folders beside ``engine/``,
and those are read first: an editable install maps ``engine.lua`` to the one checkout it was
made from, so a second checkout of the repository (a clean clone under test, a git worktree)
would otherwise run its own Python with another checkout's Lua and SQL.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["packaged"]

_CHECKOUT = Path(__file__).resolve().parent.parent


def packaged(name: str) -> Traversable:
    """The folder ``name`` ("lua" or "migrations") of this very ``engine``."""
    beside = _CHECKOUT / name
    # pyproject.toml beside engine/ means a source checkout, not site-packages (where some other
    # distribution could have installed a top-level folder of the same name).
    if (_CHECKOUT / "pyproject.toml").is_file() and beside.is_dir():
        return beside
    return resources.files(f"engine.{name}")
