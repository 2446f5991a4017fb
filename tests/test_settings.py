"""Settings.from_env: defaults, parsing of every variable, refusals (pure: a plain dict, never os.environ)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from hubgate.settings import Settings, SettingsError

# One non-default value for every field, as its variable would be written, and the parsed value.
EVERY_VARIABLE: dict[str, tuple[str, Any]] = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9000", 9000),
    "log_level": ("DEBUG", "debug"),
    "aws_region": ("eu-west-1", "eu-west-1"),
    "bedrock_endpoint_url": ("http://127.0.0.1:4000", "http://127.0.0.1:4000"),
    "upstream_connect_timeout": ("2.5", 2.5),
    "upstream_read_timeout": ("120", 120.0),
    "upstream_max_attempts": ("3", 3),
    "jwt_hs256_secret": ("s3cret", "s3cret"),
    "jwt_jwks_url": ("https://issuer/.well-known/jwks.json", "https://issuer/.well-known/jwks.json"),
    "jwt_issuer": ("https://issuer", "https://issuer"),
    "jwt_audience": ("hubgate", "hubgate"),
    "jwt_client_id": ("client-1", "client-1"),
    "jwt_algorithms": ("RS256", ("RS256",)),
    "jwt_leeway_seconds": ("5", 5.0),
    "tenant_claim": ("tid", "tid"),
    "user_claim": ("email", "email"),
    "tenants_file": ("/etc/hubgate/tenants.yaml", "/etc/hubgate/tenants.yaml"),
    "allowed_origins": ("https://a.example, https://b.example", ("https://a.example", "https://b.example")),
    "max_message_bytes": ("131072", 131072),
    "max_streams_per_connection": ("8", 8),
    "auth_timeout_seconds": ("1.5", 1.5),
    "ping_interval_seconds": ("0", 0.0),
    "ping_timeout_seconds": ("10", 10.0),
    "auth_expiry_warning_seconds": ("30", 30.0),
    "redis_url": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    "rate_limit_failure_mode": ("closed", "closed"),
    "log_format": ("text", "text"),
    "expected_instances": ("5", 5),
    "redis_timeout_ms": ("20", 20),
    "redis_max_connections": ("16", 16),
    "lease_ttl_seconds": ("10", 10.0),
    "instance_id": ("pod-a", "pod-a"),
    "session_ttl_seconds": ("60", 60.0),
    "session_max_turns": ("10", 10),
    "session_max_tokens": ("4000", 4000),
    "resume_ttl_seconds": ("30", 30.0),
    "resume_max_frames": ("100", 100),
    "stream_grace_seconds": ("5", 5.0),
    "drain_seconds": ("15", 15.0),
    "emulator_ttft_ms": ("40", 40.0),
    "emulator_token_delay_ms": ("2.5", 2.5),
    "gc_threshold": ("700,10,10", (700, 10, 10)),
}


def env_name(field: str) -> str:
    return "HUBGATE_" + field.upper()


def sample(field: dataclasses.Field[Any]) -> tuple[str, Any]:
    """A variable value and its parsed result: the table above, or one derived from the default."""
    if field.name in EVERY_VARIABLE:
        return EVERY_VARIABLE[field.name]
    default = getattr(Settings(), field.name)
    if isinstance(default, bool):
        return ("false", False) if default else ("true", True)
    if isinstance(default, int):
        return str(default + 7), default + 7
    if isinstance(default, float):
        return str(default + 7.5), default + 7.5
    if isinstance(default, tuple):
        return "a,b", ("a", "b")
    return "sample-value", "sample-value"


FIELDS = sorted(dataclasses.fields(Settings), key=lambda f: f.name)


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    expected = Settings()
    for f in dataclasses.fields(Settings):
        if f.name != "instance_id":
            assert getattr(settings, f.name) == getattr(expected, f.name), f.name
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.log_level == "info"
    assert settings.aws_region == "us-east-1"
    assert settings.bedrock_endpoint_url is None
    assert settings.upstream_max_attempts == 1
    assert settings.jwt_algorithms == ("RS256", "ES256")
    assert settings.jwt_hs256_secret is None
    assert settings.tenant_claim == "custom:tenant_id"
    assert settings.user_claim == "sub"
    assert settings.tenants_file is None
    assert settings.allowed_origins == ()
    assert settings.max_message_bytes == 65536
    assert settings.max_streams_per_connection == 4
    assert settings.auth_timeout_seconds == 5.0
    assert settings.ping_interval_seconds == 20.0
    assert settings.auth_expiry_warning_seconds == 60.0
    assert settings.redis_url is None
    assert settings.rate_limit_failure_mode == "local"


def test_instance_id_defaults_to_a_fresh_random_id() -> None:
    first, second = Settings.from_env({}).instance_id, Settings.from_env({}).instance_id
    assert len(first) == 12
    assert first != second


@pytest.mark.parametrize("field", FIELDS, ids=[f.name for f in FIELDS])
def test_every_variable_is_read(field: dataclasses.Field[Any]) -> None:
    text, parsed = sample(field)
    settings = Settings.from_env({env_name(field.name): text})
    assert getattr(settings, field.name) == parsed
    assert getattr(settings, field.name) != getattr(Settings(), field.name)


def test_every_variable_at_once() -> None:
    settings = Settings.from_env({env_name(f.name): sample(f)[0] for f in FIELDS})
    for field in FIELDS:
        assert getattr(settings, field.name) == sample(field)[1], field.name


def test_env_names_cover_every_field() -> None:
    names = Settings.env_names()
    assert names == {env_name(f.name) for f in dataclasses.fields(Settings)}
    assert "HUBGATE_MAX_STREAMS_PER_CONNECTION" in names
    assert "HUBGATE_TENANT_CLAIM" in names


def test_values_are_stripped_and_blank_means_default() -> None:
    settings = Settings.from_env(
        {
            "HUBGATE_PORT": " 9001 ",
            "HUBGATE_HOST": "   ",
            "HUBGATE_REDIS_URL": "",
            "HUBGATE_JWT_ISSUER": " iss ",
        }
    )
    assert settings.port == 9001
    assert settings.host == "127.0.0.1"
    assert settings.redis_url is None
    assert settings.jwt_issuer == "iss"


def test_lists_split_on_commas_and_drop_blanks() -> None:
    settings = Settings.from_env(
        {"HUBGATE_ALLOWED_ORIGINS": " https://a ,,https://b, ", "HUBGATE_JWT_ALGORITHMS": "ES256,RS256"}
    )
    assert settings.allowed_origins == ("https://a", "https://b")
    assert settings.jwt_algorithms == ("ES256", "RS256")


def test_other_variables_are_ignored() -> None:
    settings = Settings.from_env({"PORT": "1", "HUBGATE_UNKNOWN": "x", "hubgate_port": "2"})
    assert settings.port == 8080


def test_os_environ_is_never_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBGATE_PORT", "1234")
    monkeypatch.setenv("HUBGATE_REDIS_URL", "redis://elsewhere")
    settings = Settings.from_env({})
    assert settings.port == 8080
    assert settings.redis_url is None


def test_only_the_given_mapping_is_consulted() -> None:
    class Recording(dict[str, str]):
        asked: set[str]

        def get(self, key: str, default: Any = None) -> Any:
            self.asked.add(key)
            return super().get(key, default)

    env = Recording()
    env.asked = set()
    Settings.from_env(env)
    assert env.asked <= Settings.env_names()
    assert env.asked, "from_env must read its variables from the mapping it is given"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("PORT", "http", "must be an integer"),
        ("PORT", "80.5", "must be an integer"),
        ("PORT", "-1", "must be >= 0"),
        ("UPSTREAM_MAX_ATTEMPTS", "0", "must be >= 1"),
        ("MAX_MESSAGE_BYTES", "1023", "must be >= 1024"),
        ("MAX_STREAMS_PER_CONNECTION", "0", "must be >= 1"),
        ("EXPECTED_INSTANCES", "0", "must be >= 1"),
        ("REDIS_TIMEOUT_MS", "0", "must be >= 1"),
        ("REDIS_MAX_CONNECTIONS", "0", "must be >= 1"),
        ("SESSION_MAX_TURNS", "0", "must be >= 1"),
        ("SESSION_MAX_TOKENS", "0", "must be >= 1"),
        ("RESUME_MAX_FRAMES", "15", "must be >= 16"),
        ("UPSTREAM_READ_TIMEOUT", "soon", "must be a number"),
        ("UPSTREAM_CONNECT_TIMEOUT", "-1", "must be >= 0"),
        ("AUTH_TIMEOUT_SECONDS", "-0.5", "must be >= 0"),
        ("PING_INTERVAL_SECONDS", "20s", "must be a number"),
        ("JWT_LEEWAY_SECONDS", "-1", "must be >= 0"),
        ("LEASE_TTL_SECONDS", "0.5", "must be >= 1"),
        ("SESSION_TTL_SECONDS", "0", "must be >= 1"),
        ("RESUME_TTL_SECONDS", "0", "must be >= 1"),
        ("DRAIN_SECONDS", "-5", "must be >= 0"),
        ("AUTH_TIMEOUT_SECONDS", "nan", "must be a finite number"),
        ("DRAIN_SECONDS", "inf", "must be a finite number"),
        ("RATE_LIMIT_FAILURE_MODE", "open", "must be 'closed' or 'local'"),
        ("RATE_LIMIT_FAILURE_MODE", "CLOSED", "must be 'closed' or 'local'"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"HUBGATE_" + name: value})
    message = str(info.value)
    assert message.startswith("HUBGATE_" + name + " ")
    assert fragment in message


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


@pytest.mark.parametrize("value", ["none", "None", "NONE", "RS256,none", " none ,ES256"])
def test_alg_none_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="HUBGATE_JWT_ALGORITHMS may not contain 'none'"):
        Settings.from_env({"HUBGATE_JWT_ALGORITHMS": value})


def test_minimums_are_accepted() -> None:
    settings = Settings.from_env(
        {
            "HUBGATE_PORT": "0",
            "HUBGATE_MAX_MESSAGE_BYTES": "1024",
            "HUBGATE_RESUME_MAX_FRAMES": "16",
            "HUBGATE_LEASE_TTL_SECONDS": "1",
            "HUBGATE_AUTH_TIMEOUT_SECONDS": "0",
        }
    )
    assert settings.port == 0
    assert settings.max_message_bytes == 1024
    assert settings.resume_max_frames == 16
    assert settings.lease_ttl_seconds == 1.0


# --------------------------------------------------------------------------- the object


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_replace_returns_a_changed_copy() -> None:
    settings = Settings.from_env({"HUBGATE_PORT": "9000"})
    changed = settings.replace(port=9001, host="0.0.0.0")
    assert (changed.port, changed.host) == (9001, "0.0.0.0")
    assert settings.port == 9000
    assert changed.instance_id == settings.instance_id
