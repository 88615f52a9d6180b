"""`make demo`, from a clean clone of what is committed, ends in `invariants: ok`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_make_demo_from_a_clean_clone(tmp_path: Path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    # The clone shares this run's virtualenv (installing it again would only test pip); `-o`
    # keeps make from reinstalling it, and `python -m` runs the clone's own code.
    venv = Path(sys.prefix)
    result = subprocess.run(
        ["make", "--no-print-directory", "demo", f"VENV={venv}", "-o", f"{venv}/.installed"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "invariants: ok"
    assert any(line.startswith("orders in Postgres: ") for line in lines)
