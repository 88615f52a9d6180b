"""Shopper identity: bearer JWTs, verified with a pinned algorithm, cached until they expire.

pyjwt's decode costs ~55 µs a call on a 2-core machine (the bench's ceiling with and without the
cache: see README), more than the whole Redis round trip's client overhead; a shopper in a storm
sends the same token many times, so a verified token is remembered until its own ``exp``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import jwt

from engine.errors import Unauthorized
from engine.ids import is_user_id
from engine.settings import ConfigError, Settings

__all__ = ["TokenVerifier", "mint_token", "mint_tokens"]

# Enough for every distinct shopper of a large sale; past it the cache starts over rather than
# growing without bound (a flood of junk tokens cannot exhaust memory).
_CACHE_LIMIT = 200_000


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.jwt_verify_key
        self._algorithms = [settings.jwt_algorithm]
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._cache: dict[str, tuple[str, float]] = {}

    def user_of(self, authorization: str | None) -> str:
        """The user id of an ``Authorization: Bearer …`` header, or Unauthorized."""
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("an 'Authorization: Bearer <token>' header is required")
        token = authorization[7:].strip()
        cached = self._cache.get(token)
        if cached is not None:
            user, expires = cached
            if time.time() < expires:
                return user
            del self._cache[token]
        claims = self.claims_of(token)
        user = claims["sub"]
        if not isinstance(user, str) or not is_user_id(user):
            raise Unauthorized("the token's subject is not a valid user id")
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (user, float(claims["exp"]))
        return user

    def claims_of(self, token: str) -> dict[str, Any]:
        """The verified claims of a token (pinned algorithm, issuer, audience, expiry), or
        Unauthorized: shoppers' tokens and admins' alike."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["sub", "exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        return claims


def _signing_key(settings: Settings) -> str:
    if settings.jwt_algorithm == "RS256":
        if not settings.jwt_private_key:
            raise ConfigError("minting RS256 tokens needs FLASHSALE_JWT_PRIVATE_KEY")
        return settings.jwt_private_key
    return settings.jwt_verify_key


def mint_token(
    settings: Settings, user_id: str, ttl_s: int = 3600, roles: Sequence[str] = ()
) -> str:
    return mint_tokens(settings, [user_id], ttl_s, roles)[0]


def mint_tokens(
    settings: Settings, user_ids: Iterable[str], ttl_s: int = 3600, roles: Sequence[str] = ()
) -> list[str]:
    """Signed tokens for ``user_ids``; ``roles`` (``admin``, ``customer``) go in a ``roles``
    claim when given: a token without one is a customer's."""
    key = _signing_key(settings)
    now = int(time.time())
    tokens = []
    for user in user_ids:
        if not is_user_id(user):
            raise ValueError(f"not a valid user id: {user!r}")
        claims = {
            "sub": user,
            "iss": settings.jwt_issuer,
            "aud": settings.jwt_audience,
            "iat": now,
            "exp": now + ttl_s,
        }
        if roles:
            claims["roles"] = list(roles)
        tokens.append(jwt.encode(claims, key, algorithm=settings.jwt_algorithm))
    return tokens
