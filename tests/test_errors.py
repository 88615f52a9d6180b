"""The problem codes: each one raised somewhere, with the status the table gives it, and rendered
with a title that fits that status."""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import orjson

from engine import errors
from engine.errors import CLI_ONLY_CODES, PROBLEM_TYPES, ProblemError, problem_response

ROOT = Path(__file__).resolve().parents[1]
# The service's code: the bench's stand-in servers (loadtests/) answer like it but are not it.
SERVICE = [ROOT / "engine", ROOT / "workers"]

_CLASSES = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, ProblemError)
}


@dataclass(frozen=True)
class RaiseSite:
    where: str
    cls: type[ProblemError]
    code: str
    status: int | None  # the call's own status=, if it passes one

    def error(self) -> ProblemError:
        """The problem as this site makes it (a detail of its own)."""
        if not _takes_code(self.cls):
            return self.cls("a detail")  # type: ignore[call-arg]
        if self.status is None:
            return self.cls(self.code, "a detail")
        return self.cls(self.code, "a detail", status=self.status)


def _takes_code(cls: type[ProblemError]) -> bool:
    return "code" in inspect.signature(cls).parameters


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _status(call: ast.Call) -> int | None:
    for keyword in call.keywords:
        if keyword.arg == "status":
            assert isinstance(keyword.value, ast.Constant), ast.unparse(call)
            return int(keyword.value.value)
    return None


def raise_sites() -> list[RaiseSite]:
    """Every place the service makes a problem with a code: a call of a ProblemError class
    with a literal code, or a class that fixes its code (``super().__init__("code", ...)``)."""
    sites = []
    for path in sorted(p for root in SERVICE for p in root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        fixed = {
            node: _CLASSES[cls.name]
            for cls in ast.walk(tree)
            if isinstance(cls, ast.ClassDef) and cls.name in _CLASSES
            for node in ast.walk(cls)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "__init__"
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            code = _literal(node.args[0])
            if node in fixed:
                if code is not None:
                    sites.append(RaiseSite(where, fixed[node], code, None))
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name not in _CLASSES or not _takes_code(_CLASSES[name]):
                continue
            # Literal codes keep every code findable, by this test and by a grep.
            assert code is not None, f"{where}: a problem code must be a literal"
            sites.append(RaiseSite(where, _CLASSES[name], code, _status(node)))
    return sites


def test_every_code_is_raised_and_renders_its_status_and_a_fitting_title():
    sites = raise_sites()
    unknown = {site.where: site.code for site in sites if site.code not in PROBLEM_TYPES}
    assert not unknown, f"raised but not in PROBLEM_TYPES: {unknown}"
    for code, status in PROBLEM_TYPES.items():
        where = [site for site in sites if site.code == code]
        assert where, f"{code} is in PROBLEM_TYPES but nothing raises it"
        for site in where:
            response = problem_response(site.error())
            body = orjson.loads(response.body)
            assert response.status_code == body["status"] == status, site
            assert body["title"] == HTTPStatus(status).phrase, site
            assert body["code"] == code and body["type"].endswith("/" + code)
            if status < 500:
                assert "internal" not in body["title"].lower(), site


def test_every_class_renders_the_title_of_its_own_status():
    for cls in _CLASSES.values():
        error = RaiseSite("", cls, "some-code", None).error()
        assert error.body()["title"] == HTTPStatus(error.status_code).phrase, cls


def test_the_module_docstring_tree_lists_every_code_and_no_other():
    doc = errors.__doc__ or ""
    tree = doc[doc.index("ProblemError (500)") :]
    named = {
        word.strip(",*")
        for word in tree.split()
        if "-" in word and word.strip(",*").replace("-", "").isalpha()
    }
    assert named == set(PROBLEM_TYPES)
    for code in CLI_ONLY_CODES:
        assert f"{code}*" in tree, f"{code} is only the CLI's: mark it with *"
