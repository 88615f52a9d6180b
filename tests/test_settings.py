"""Settings come from the environment only, and production refuses to run without a JWT key."""

from __future__ import annotations

import pytest

from engine.settings import ConfigError, Settings

KEY = "k" * 32


def test_production_refuses_to_start_without_a_jwt_key():
    with pytest.raises(ConfigError, match="JWT"):
        Settings.from_env({})


def test_production_with_a_key_reads_everything():
    settings = Settings.from_env(
        {
            "FLASHSALE_JWT_SECRET": KEY,
            "FLASHSALE_WEBHOOK_SECRET": "whsec_test",
            "FLASHSALE_REDIS_URL": "redis://r:1/2",
            "FLASHSALE_HOLD_SECONDS": "30",
            "FLASHSALE_SERVER_WORKERS": "3",
        }
    )
    assert settings.redis_url == "redis://r:1/2"
    assert (settings.hold_seconds, settings.server_workers) == (30, 3)
    assert settings.jwt_algorithm == "HS256"
    assert Settings.from_env(settings.as_env()) == settings


def test_development_makes_a_throwaway_key():
    first = Settings.from_env({"FLASHSALE_ENV": "development"})
    second = Settings.from_env({"FLASHSALE_ENV": "development"})
    assert first.jwt_secret and first.jwt_secret != second.jwt_secret


def test_production_refuses_to_start_without_a_webhook_secret():
    with pytest.raises(ConfigError, match="WEBHOOK"):
        Settings.from_env({"FLASHSALE_JWT_SECRET": KEY})


def test_public_key_pins_rs256():
    settings = Settings.from_env(
        {"FLASHSALE_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "FLASHSALE_ENV": "test"}
    )
    assert settings.jwt_algorithm == "RS256"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLASHSALE_JWT_SECRET": "short"}, "32 bytes"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_HOLD_SECONDS": "ten"}, "integer"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_HOLD_SECONDS": "0"}, "at least 1"),
        ({"FLASHSALE_ENV": "staging"}, "FLASHSALE_ENV"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_SOLD_OUT_REFRESH_MS": "-1"}, "at least 0"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_DRAIN_POLL_MS": "0"}, "DRAIN_POLL_MS.*1"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_MAX_HEADER_BYTES": "16k"}, "HEADER_BYTES.*int"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_MAX_HEADER_BYTES": "512"}, "at least 1024"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_MAX_HEADERS": "4"}, "MAX_HEADERS.*at least 8"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_REQUEST_READ_TIMEOUT_S": "0"}, "TIMEOUT_S.*1"),
        ({"FLASHSALE_JWT_SECRET": KEY, "FLASHSALE_REQUEST_READ_TIMEOUT_S": "0.5"}, "integer"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_gateway_rate_defaults_under_stripes_limit_and_is_validated():
    base = {"FLASHSALE_ENV": "development"}
    assert Settings.from_env(base).gateway_rate_per_s == 80
    settings = Settings.from_env(base | {"FLASHSALE_GATEWAY_RATE_PER_S": "25"})
    assert settings.gateway_rate_per_s == 25
    assert Settings.from_env(settings.as_env()).gateway_rate_per_s == 25
    for bad in ("0", "-5", "fast", "2.5"):
        with pytest.raises(ConfigError, match="FLASHSALE_GATEWAY_RATE_PER_S"):
            Settings.from_env(base | {"FLASHSALE_GATEWAY_RATE_PER_S": bad})
