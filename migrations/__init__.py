"""Numbered SQL migrations, shipped as package data of ``engine.migrations``."""
