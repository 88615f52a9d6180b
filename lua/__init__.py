"""The Lua scripts, shipped as package data of ``engine.lua``; see ``engine.scripts``."""
