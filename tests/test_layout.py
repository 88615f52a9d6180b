"""The service package holds the service: importing the ASGI app loads no tooling, and ``engine``
never imports ``workers``, ``loadtests`` or ``localrun`` (only the CLI does, inside the command
that needs them)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from engine.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Packages that are not the service: the background half, the bench and load tools, the local
# servers and demo, and what only those need.
NOT_THE_SERVICE = ("workers", "loadtests", "localrun", "arq", "matplotlib", "locust", "aiohttp")
SERVICE_MAX_LINES = 420


def test_importing_and_building_the_asgi_app_loads_no_tooling(settings: Settings) -> None:
    program = (
        "import sys\n"
        "from engine.http import asgi\n"
        "asgi.create()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {NOT_THE_SERVICE!r}))\n"
    )
    env = {**os.environ, **settings.as_env()}
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(top-level package imported, whether at module level) for every import in ``tree``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module.split(".")[0], top))
            inside = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            visit(child, inside)

    visit(tree, True)
    return found


def test_engine_never_imports_workers_or_tooling() -> None:
    offenders = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        relative = path.relative_to(ROOT)
        cli = relative.parts[:2] == ("engine", "cli")
        for package, at_module_level in _imports(ast.parse(path.read_text())):
            if package not in {"workers", "loadtests", "localrun"}:
                continue
            # The CLI is where the commands meet: it may import a command's tooling, but only
            # inside that command, so `flashsale --help` and the other commands load none of it.
            if cli and not at_module_level:
                continue
            offenders.append(f"{relative} imports {package}")
    assert offenders == []


def test_the_import_walk_sees_imports_inside_functions() -> None:
    tree = ast.parse("import os\ndef f():\n    from workers import settings\n")
    assert _imports(tree) == [("os", True), ("workers", False)]


def test_no_service_module_is_overgrown() -> None:
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for path in (ROOT / "engine").rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > SERVICE_MAX_LINES} == {}
