"""Every knob the engine has, read from the environment once.

This is the only module that reads ``os.environ``. Everything else receives a ``Settings``.

| variable                       | default                                   |
| ------------------------------ | ----------------------------------------- |
| FLASHSALE_ENV                  | ``production`` (``development`` relaxes)  |
| FLASHSALE_REDIS_URL            | ``redis://127.0.0.1:6379/0``              |
| FLASHSALE_DATABASE_URL         | ``postgresql://postgres@127.0.0.1/flashsale`` |
| FLASHSALE_JWT_SECRET           | none: HS256 shared secret                 |
| FLASHSALE_JWT_PUBLIC_KEY       | none: PEM for RS256 (wins over the secret)|
| FLASHSALE_JWT_ISSUER           | ``flashsale``                             |
| FLASHSALE_JWT_AUDIENCE         | ``flashsale-shoppers``                    |
| FLASHSALE_HOLD_SECONDS         | ``600``                                   |
| FLASHSALE_SERVER_WORKERS       | ``1``                                     |
| FLASHSALE_HOST / _PORT         | ``127.0.0.1`` / ``8000``                  |
| FLASHSALE_REDIS_POOL_SIZE      | ``64``                                    |
| FLASHSALE_MAX_BODY_BYTES       | ``4096``                                  |
| FLASHSALE_MAX_HEADER_BYTES     | ``16384``: names plus values of one request |
| FLASHSALE_MAX_HEADERS          | ``100``: header lines of one request      |
| FLASHSALE_REQUEST_READ_TIMEOUT_S | ``10``: to receive a request's head and body |
| FLASHSALE_DRAIN_BATCH          | ``1000``                                  |
| FLASHSALE_CLAIM_IDLE_MS        | ``30000``: pending this long = its worker died |
| FLASHSALE_ADMIN_TOKEN          | none: admin routes disabled               |
| FLASHSALE_STRIPE_API_KEY       | none: the offline mock gateway is used    |
| FLASHSALE_STRIPE_API_BASE      | Stripe's own (tests point it at localstripe) |
| FLASHSALE_WEBHOOK_SECRET       | none: webhook signing secret (``whsec_…``) |
| FLASHSALE_WEBHOOK_TOLERANCE_S  | ``300``: older signatures are refused     |
| FLASHSALE_REDIS_DEADLINE_MS    | ``1000``: the server's wait for Redis, then 503 |
| FLASHSALE_MAX_ORDERS_IN_FLIGHT | ``2048``: orders awaiting Redis per process; more get 503 |
| FLASHSALE_LOG_FORMAT           | ``auto``: text on a terminal, else JSON lines; or json, text |
| FLASHSALE_GATEWAY_RATE_PER_S   | ``80``: payment gateway calls a second, whole deployment |
| FLASHSALE_METRICS              | ``on``: count requests for ``GET /metrics``; or ``off`` |
| FLASHSALE_METRICS_DIR          | ``<temp dir>/flashsale-metrics-<uid>``: per machine, user |
| FLASHSALE_STOCK_LOW_UNITS      | ``10``: ``stock.low`` when a sale's available units fall to it |
| FLASHSALE_RETIRE_AFTER_S       | ``259200`` (3 days): a finished sale leaves the workers' walk |
| FLASHSALE_DELIVERY_RETRY_S     | ``0,5,300,1800,7200,18000,36000,36000``: waits, per attempt |
| FLASHSALE_DELIVERY_TIMEOUT_S   | ``10``: one delivery's whole HTTP exchange |
| FLASHSALE_DELIVERY_CONCURRENCY | ``32``: deliveries in flight per worker process |
| FLASHSALE_DELIVERY_PER_ENDPOINT | ``4``: of those, to one subscription   |
| FLASHSALE_ENDPOINT_DISABLE_AFTER_S | ``432000`` (5 days) failing: disabled |
| FLASHSALE_SECRET_GRACE_S       | ``86400``: a rotated-out secret still signs this long |
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["LOG_FORMATS", "ConfigError", "Settings"]

LOG_FORMATS = ("auto", "json", "text")


class ConfigError(RuntimeError):
    """The environment does not describe a runnable engine."""


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _seconds_list(env: Mapping[str, str], name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        values = tuple(int(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be whole seconds joined by commas, got {raw!r}") from None
    if any(value < 0 for value in values):
        raise ConfigError(f"{name} must not hold a negative wait, got {raw!r}")
    return values


def _default_metrics_dir() -> str:
    # Per user: a folder another user made first (root, say) would refuse this one's files.
    return os.path.join(tempfile.gettempdir(), f"flashsale-metrics-{os.getuid()}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    environment: str = "production"
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/flashsale"
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_private_key: str | None = field(default=None, repr=False)
    jwt_issuer: str = "flashsale"
    jwt_audience: str = "flashsale-shoppers"
    hold_seconds: int = 600
    server_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    redis_pool_size: int = 64
    max_body_bytes: int = 4096
    # Enforced by the HTTP protocol (engine.http.protocol) before the app sees a request.
    max_header_bytes: int = 16_384
    max_headers: int = 100
    request_read_timeout_s: int = 10
    drain_batch: int = 1000
    # The drain's wait after each pass: the ledger trails Redis by about this much under a
    # storm, and each batch is bigger (cheaper per order) the longer it is.
    drain_poll_ms: int = 100
    claim_idle_ms: int = 30_000
    admin_token: str | None = field(default=None, repr=False)
    stripe_api_key: str | None = field(default=None, repr=False)
    stripe_api_base: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_tolerance_s: int = 300
    # How often a server re-reads a sold-out sale it answers by itself (engine.http.soldout); 0: it
    # does not (the default: with several server processes it can break a replay's answer).
    sold_out_refresh_ms: int = 0
    # How long a server waits for Redis before answering 503 (engine.http.pipeline): a stalled
    # Redis must not hold every shopper.
    redis_deadline_ms: int = 1000
    # Orders of one server process waiting for Redis at once; past it new ones get 503 at once
    # rather than queueing behind a slow Redis (engine.http.coalescer).
    max_orders_in_flight: int = 2048
    # auto: text on a terminal, JSON lines otherwise (engine.logs).
    log_format: str = "auto"
    # Payment gateway calls a second, every server and worker together (engine.gatewaylimit):
    # under Stripe's live-mode limit of 100 operations a second per account.
    gateway_rate_per_s: int = 80
    # Whether servers count requests for /metrics (engine.http.metrics); off only to measure
    # what counting costs.
    metrics: bool = True
    # Where every server and worker process of the machine writes its metrics for /metrics to
    # add up (prometheus-client's multiprocess mode).
    metrics_dir: str = field(default_factory=lambda: _default_metrics_dir())
    # Events to subscribers (engine.events, workers.deliveries).
    stock_low_units: int = 10
    # A sale over this long with nothing left to do leaves the live set every job walks each
    # tick (engine.sales.retire_sale): Stripe retries a webhook for three days.
    retire_after_s: int = 3 * 86_400
    # The wait before each attempt of a delivery: the Standard Webhooks schedule, its length the
    # number of attempts. Tests shorten it.
    delivery_retry_s: tuple[int, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    delivery_timeout_s: int = 10
    delivery_concurrency: int = 32
    # A slow endpoint holds at most this many of the process's slots; the others keep moving.
    delivery_per_endpoint: int = 4
    endpoint_disable_after_s: int = 5 * 86400
    secret_grace_s: int = 86400

    @property
    def jwt_algorithm(self) -> str:
        # Pinned: a token's own "alg" header is never trusted to choose.
        return "RS256" if self.jwt_public_key else "HS256"

    @property
    def jwt_verify_key(self) -> str:
        key = self.jwt_public_key or self.jwt_secret
        if not key:
            raise ConfigError(
                "no JWT key: set FLASHSALE_JWT_SECRET (HS256) or FLASHSALE_JWT_PUBLIC_KEY (RS256)"
            )
        return key

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        environment = env.get("FLASHSALE_ENV", "production")
        if environment not in ("production", "development", "test"):
            raise ConfigError(
                f"FLASHSALE_ENV must be production, development or test, got {environment!r}"
            )
        settings = cls(
            environment=environment,
            redis_url=env.get("FLASHSALE_REDIS_URL", cls.redis_url),
            database_url=env.get("FLASHSALE_DATABASE_URL", cls.database_url),
            jwt_secret=env.get("FLASHSALE_JWT_SECRET") or None,
            jwt_public_key=env.get("FLASHSALE_JWT_PUBLIC_KEY") or None,
            jwt_private_key=env.get("FLASHSALE_JWT_PRIVATE_KEY") or None,
            jwt_issuer=env.get("FLASHSALE_JWT_ISSUER", cls.jwt_issuer),
            jwt_audience=env.get("FLASHSALE_JWT_AUDIENCE", cls.jwt_audience),
            hold_seconds=_int(env, "FLASHSALE_HOLD_SECONDS", cls.hold_seconds, 1),
            server_workers=_int(env, "FLASHSALE_SERVER_WORKERS", cls.server_workers, 1),
            host=env.get("FLASHSALE_HOST", cls.host),
            port=_int(env, "FLASHSALE_PORT", cls.port, 0),
            redis_pool_size=_int(env, "FLASHSALE_REDIS_POOL_SIZE", cls.redis_pool_size, 1),
            max_body_bytes=_int(env, "FLASHSALE_MAX_BODY_BYTES", cls.max_body_bytes, 64),
            # An order needs a few headers and a bearer token of several hundred bytes.
            max_header_bytes=_int(env, "FLASHSALE_MAX_HEADER_BYTES", cls.max_header_bytes, 1024),
            max_headers=_int(env, "FLASHSALE_MAX_HEADERS", cls.max_headers, 8),
            request_read_timeout_s=_int(
                env, "FLASHSALE_REQUEST_READ_TIMEOUT_S", cls.request_read_timeout_s, 1
            ),
            drain_batch=_int(env, "FLASHSALE_DRAIN_BATCH", cls.drain_batch, 1),
            drain_poll_ms=_int(env, "FLASHSALE_DRAIN_POLL_MS", cls.drain_poll_ms, 1),
            claim_idle_ms=_int(env, "FLASHSALE_CLAIM_IDLE_MS", cls.claim_idle_ms, 1),
            admin_token=env.get("FLASHSALE_ADMIN_TOKEN") or None,
            stripe_api_key=env.get("FLASHSALE_STRIPE_API_KEY") or None,
            stripe_api_base=env.get("FLASHSALE_STRIPE_API_BASE") or None,
            webhook_secret=env.get("FLASHSALE_WEBHOOK_SECRET") or None,
            webhook_tolerance_s=_int(env, "FLASHSALE_WEBHOOK_TOLERANCE_S", 300, 1),
            sold_out_refresh_ms=_int(
                env, "FLASHSALE_SOLD_OUT_REFRESH_MS", cls.sold_out_refresh_ms, 0
            ),
            redis_deadline_ms=_int(env, "FLASHSALE_REDIS_DEADLINE_MS", cls.redis_deadline_ms, 10),
            log_format=_choice(env, "FLASHSALE_LOG_FORMAT", cls.log_format, LOG_FORMATS),
            max_orders_in_flight=_int(
                env, "FLASHSALE_MAX_ORDERS_IN_FLIGHT", cls.max_orders_in_flight, 1
            ),
            gateway_rate_per_s=_int(env, "FLASHSALE_GATEWAY_RATE_PER_S", cls.gateway_rate_per_s, 1),
            metrics=_choice(env, "FLASHSALE_METRICS", "on", ("on", "off")) == "on",
            metrics_dir=env.get("FLASHSALE_METRICS_DIR") or _default_metrics_dir(),
            stock_low_units=_int(env, "FLASHSALE_STOCK_LOW_UNITS", cls.stock_low_units, 0),
            # At least 5 minutes: the event job must see a sale over before it is retired.
            retire_after_s=_int(env, "FLASHSALE_RETIRE_AFTER_S", cls.retire_after_s, 300),
            delivery_retry_s=_seconds_list(env, "FLASHSALE_DELIVERY_RETRY_S", cls.delivery_retry_s),
            delivery_timeout_s=_int(env, "FLASHSALE_DELIVERY_TIMEOUT_S", cls.delivery_timeout_s, 1),
            delivery_concurrency=_int(
                env, "FLASHSALE_DELIVERY_CONCURRENCY", cls.delivery_concurrency, 1
            ),
            delivery_per_endpoint=_int(
                env, "FLASHSALE_DELIVERY_PER_ENDPOINT", cls.delivery_per_endpoint, 1
            ),
            endpoint_disable_after_s=_int(
                env, "FLASHSALE_ENDPOINT_DISABLE_AFTER_S", cls.endpoint_disable_after_s, 1
            ),
            secret_grace_s=_int(env, "FLASHSALE_SECRET_GRACE_S", cls.secret_grace_s, 0),
        )
        if settings.environment == "production" and not (
            settings.jwt_secret or settings.jwt_public_key
        ):
            raise ConfigError(
                "refusing to start in production without a JWT key: set FLASHSALE_JWT_SECRET "
                "or FLASHSALE_JWT_PUBLIC_KEY (or FLASHSALE_ENV=development for a throwaway one)"
            )
        if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < 32:
            # RFC 7518 3.2: an HS256 key shorter than the hash is guessable offline.
            raise ConfigError("FLASHSALE_JWT_SECRET must be at least 32 bytes")
        if settings.environment == "production" and not settings.webhook_secret:
            raise ConfigError(
                "refusing to start in production without FLASHSALE_WEBHOOK_SECRET: webhook "
                "signatures are verified in every mode"
            )
        if settings.webhook_secret is None:
            # Development only: the mock gateway signs its events with this one.
            settings = replace(settings, webhook_secret="whsec_" + secrets.token_urlsafe(24))
        if settings.jwt_secret is None and settings.jwt_public_key is None:
            # Development only: a key that dies with the process, so nothing can rely on it.
            settings = replace(settings, jwt_secret=secrets.token_urlsafe(32))
        return settings

    def as_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {
            "FLASHSALE_ENV": self.environment,
            "FLASHSALE_REDIS_URL": self.redis_url,
            "FLASHSALE_DATABASE_URL": self.database_url,
            "FLASHSALE_JWT_ISSUER": self.jwt_issuer,
            "FLASHSALE_JWT_AUDIENCE": self.jwt_audience,
            "FLASHSALE_HOLD_SECONDS": str(self.hold_seconds),
            "FLASHSALE_SERVER_WORKERS": str(self.server_workers),
            "FLASHSALE_HOST": self.host,
            "FLASHSALE_PORT": str(self.port),
            "FLASHSALE_REDIS_POOL_SIZE": str(self.redis_pool_size),
            "FLASHSALE_MAX_BODY_BYTES": str(self.max_body_bytes),
            "FLASHSALE_MAX_HEADER_BYTES": str(self.max_header_bytes),
            "FLASHSALE_MAX_HEADERS": str(self.max_headers),
            "FLASHSALE_REQUEST_READ_TIMEOUT_S": str(self.request_read_timeout_s),
            "FLASHSALE_DRAIN_BATCH": str(self.drain_batch),
            "FLASHSALE_DRAIN_POLL_MS": str(self.drain_poll_ms),
            "FLASHSALE_CLAIM_IDLE_MS": str(self.claim_idle_ms),
            "FLASHSALE_WEBHOOK_TOLERANCE_S": str(self.webhook_tolerance_s),
            "FLASHSALE_SOLD_OUT_REFRESH_MS": str(self.sold_out_refresh_ms),
            "FLASHSALE_REDIS_DEADLINE_MS": str(self.redis_deadline_ms),
            "FLASHSALE_MAX_ORDERS_IN_FLIGHT": str(self.max_orders_in_flight),
            "FLASHSALE_LOG_FORMAT": self.log_format,
            "FLASHSALE_GATEWAY_RATE_PER_S": str(self.gateway_rate_per_s),
            "FLASHSALE_METRICS": "on" if self.metrics else "off",
            "FLASHSALE_METRICS_DIR": self.metrics_dir,
            "FLASHSALE_STOCK_LOW_UNITS": str(self.stock_low_units),
            "FLASHSALE_RETIRE_AFTER_S": str(self.retire_after_s),
            "FLASHSALE_DELIVERY_RETRY_S": ",".join(map(str, self.delivery_retry_s)),
            "FLASHSALE_DELIVERY_TIMEOUT_S": str(self.delivery_timeout_s),
            "FLASHSALE_DELIVERY_CONCURRENCY": str(self.delivery_concurrency),
            "FLASHSALE_DELIVERY_PER_ENDPOINT": str(self.delivery_per_endpoint),
            "FLASHSALE_ENDPOINT_DISABLE_AFTER_S": str(self.endpoint_disable_after_s),
            "FLASHSALE_SECRET_GRACE_S": str(self.secret_grace_s),
        }
        optional = {
            "FLASHSALE_JWT_SECRET": self.jwt_secret,
            "FLASHSALE_JWT_PUBLIC_KEY": self.jwt_public_key,
            "FLASHSALE_JWT_PRIVATE_KEY": self.jwt_private_key,
            "FLASHSALE_ADMIN_TOKEN": self.admin_token,
            "FLASHSALE_STRIPE_API_KEY": self.stripe_api_key,
            "FLASHSALE_STRIPE_API_BASE": self.stripe_api_base,
            "FLASHSALE_WEBHOOK_SECRET": self.webhook_secret,
        }
        env.update({k: v for k, v in optional.items() if v is not None})
        return env
