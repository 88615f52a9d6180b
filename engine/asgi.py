"""ASGI entry point for uvicorn: ``uvicorn --factory engine.asgi:create``."""

from __future__ import annotations

from starlette.applications import Starlette

from engine.app import create_app
from engine.settings import Settings


def create() -> Starlette:
    return create_app(Settings.from_env())
