"""Who may use the admin routes, and the audit row every admin action leaves.

An admin request proves itself with one bearer credential, one of:

- an API key (``fsk_…``, ``engine.apikeys``): it may do what its scopes say;
- a JWT signed like shoppers' tokens (same key, algorithm, issuer and audience) whose ``roles``
  claim holds ``admin``: it may do everything. A token without ``roles`` is a customer's;
- ``FLASHSALE_ADMIN_TOKEN``, when it is set: a bootstrap credential that may do everything, for
  a deployment that has no key or identity provider yet. Leave it unset once keys exist.

An unknown, revoked or expired key, or a bad token, is 401 ``invalid-token``; a customer's token
is 403 ``admin-role-required``; a key without the scope is 403 ``insufficient-scope``.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from engine import audit
from engine.apikeys import KEY_PREFIX, SCOPES, KeyCache
from engine.errors import Forbidden, ProblemError, Unauthorized
from engine.http.context import services

__all__ = ["ADMIN_ROLE", "AdminHandler", "admin_action", "require_scope"]

log = logging.getLogger("flashsale.admin")

ADMIN_ROLE = "admin"

AdminHandler = Callable[[Request, str], Awaitable[Response]]


def _key_cache(request: Request) -> KeyCache:
    cache: KeyCache | None = getattr(request.app.state, "api_key_cache", None)
    if cache is None:
        cache = request.app.state.api_key_cache = KeyCache()
    return cache


def _roles_of(request: Request, token: str) -> tuple[str, list[str]]:
    """The subject and roles of an admin's JWT, verified as shoppers' tokens are."""
    claims = services(request).verifier.claims_of(token)
    roles = claims.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Unauthorized("the token's roles claim must be a list of strings")
    return str(claims["sub"]), roles


async def require_scope(request: Request, scope: str) -> str:
    """Who is acting (for the audit), or 401/403 unless the request may do ``scope`` (one of
    ``engine.apikeys.SCOPES``). The actor of a refusal is left in ``request.state`` so the
    audit can name who was refused."""
    assert scope in SCOPES, scope
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer "):
        raise Unauthorized("an 'Authorization: Bearer <API key or token>' header is required")
    credential = given[7:].strip()
    found = services(request)
    if credential.startswith(KEY_PREFIX):
        key = await _key_cache(request).lookup(found.ledger, credential)
        if key is not None:
            # Named before the check: a revoked or expired key's use is what the audit is for.
            request.state.admin_actor = key.actor
        if key is None or not key.usable(datetime.now(UTC)):
            raise Unauthorized("the API key is unknown, revoked or expired")
        if scope not in key.scopes:
            raise Forbidden(
                "insufficient-scope", f"this API key lacks the scope {scope}", scope=scope
            )
        return key.actor
    bootstrap = found.settings.admin_token
    # Compared in constant time: the bootstrap token is the whole of its holder's credential.
    if bootstrap and hmac.compare_digest(credential.encode(), bootstrap.encode()):
        return "admin-token"
    subject, roles = _roles_of(request, credential)
    request.state.admin_actor = f"user:{subject}"
    if ADMIN_ROLE not in roles:
        raise Forbidden("admin-role-required", "this token does not carry the admin role")
    return f"user:{subject}"


def _target(request: Request) -> str | None:
    chosen = getattr(request.state, "audit_target", None)
    if chosen is not None:
        return str(chosen)
    params = request.path_params
    for name in ("order_id", "event_id", "subscription_id", "sale_id"):
        if name in params:
            return str(params[name])
    return None


def admin_action(action: str, scope: str, handler: AdminHandler) -> Callable[..., Any]:
    """The route endpoint of ``handler``: it runs once ``require_scope(scope)`` names the actor,
    and an audit row records the action (``action``, e.g. ``sale.restock``), its target (a path
    id, or ``request.state.audit_target``), any ``request.state.audit_detail`` and the outcome:
    ``ok`` or the problem code answered."""

    async def endpoint(request: Request) -> Response:
        actor: str | None = None
        outcome = "internal-error"
        try:
            actor = await require_scope(request, scope)
            response = await handler(request, actor)
            outcome = "ok"
            return response
        except ProblemError as exc:
            outcome = exc.code
            raise
        finally:
            actor = actor or getattr(request.state, "admin_actor", None)
            if actor is not None:
                await _audit(request, actor, action, outcome)

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


async def _audit(request: Request, actor: str, action: str, outcome: str) -> None:
    detail = getattr(request.state, "audit_detail", None)
    try:
        await audit.record(
            services(request).ledger, actor, action, _target(request), outcome, detail
        )
    except Exception:
        # The action has happened (or been refused) already: its answer must still reach the
        # operator, so a ledger that cannot take the row is logged loudly instead.
        log.exception(
            "audit row not written: %s %s %s %s", actor, action, _target(request), outcome
        )
