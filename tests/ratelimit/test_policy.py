"""LimitPolicy validation and scaling, key naming and the shared decision helpers."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from hubgate.errors import RateLimited, TokenRateLimited, TooManyConnections, TooManyStreams
from hubgate.ratelimit.base import (
    Verdict,
    longest_wait,
    refuse_closed_connections,
    refuse_closed_doors,
    tenant_keys,
)
from hubgate.ratelimit.policy import LimitPolicy


def test_bursts_default_to_rates() -> None:
    policy = LimitPolicy(requests_per_minute=60, tokens_per_minute=1000, per_user_requests_per_minute=5)
    assert policy.request_capacity == 60
    assert policy.token_capacity == 1000
    assert policy.user_request_capacity == 5
    assert LimitPolicy(requests_per_minute=60, request_burst=10).request_capacity == 10
    assert LimitPolicy().request_capacity is None


def test_rejects_negative_and_ambiguous_figures() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        LimitPolicy(requests_per_minute=-1)
    with pytest.raises(ValueError, match="non-negative"):
        LimitPolicy(max_connections=True)
    with pytest.raises(ValueError, match=r"needs limits\.tokens_per_minute"):
        LimitPolicy(token_burst=100)


def test_scaled_divides_every_figure_rounding_up() -> None:
    policy = LimitPolicy(
        requests_per_minute=10,
        request_burst=3,
        tokens_per_minute=1001,
        per_user_requests_per_minute=1,
        max_connections=5,
        max_concurrent_streams=2,
    )
    share = policy.scaled(2)
    assert share == LimitPolicy(
        requests_per_minute=5,
        request_burst=2,
        tokens_per_minute=501,
        per_user_requests_per_minute=1,
        max_connections=3,
        max_concurrent_streams=1,
    )
    assert policy.scaled(1) is policy
    assert LimitPolicy(requests_per_minute=3).scaled(100).requests_per_minute == 1  # never rounds to 0
    assert LimitPolicy(requests_per_minute=0).scaled(3).requests_per_minute == 0  # a closed door stays shut
    assert LimitPolicy().scaled(4) == LimitPolicy()  # unlimited stays unlimited
    with pytest.raises(ValueError):
        policy.scaled(0)


def test_keys_share_one_hash_tag_and_slot() -> None:
    keys = tenant_keys("acme")
    names = [keys.requests, keys.tokens, keys.connections, keys.streams, keys.user_requests("alice@x")]
    assert names[:4] == ["{t:acme}:rq", "{t:acme}:tk", "{t:acme}:conn", "{t:acme}:streams"]
    assert names[4] == "{t:acme}:u:alice@x:rq"
    assert len({key_slot(name.encode()) for name in names}) == 1


def test_braces_in_a_tenant_cannot_end_the_tag() -> None:
    sneaky = tenant_keys("x}:u:y")
    assert sneaky.requests == "{t:x%7D:u:y}:rq"
    # Without escaping this would be the key of user "y}" of tenant "x".
    assert sneaky.requests != tenant_keys("x").user_requests("y}")


def test_zero_limits_close_the_door_before_any_io() -> None:
    refuse_closed_doors(LimitPolicy(requests_per_minute=1))
    with pytest.raises(TooManyStreams):
        refuse_closed_doors(LimitPolicy(max_concurrent_streams=0))
    with pytest.raises(RateLimited) as refused:
        refuse_closed_doors(LimitPolicy(requests_per_minute=10, request_burst=0))
    assert refused.value.retry_after is None  # waiting will not help
    with pytest.raises(RateLimited):
        refuse_closed_doors(LimitPolicy(per_user_requests_per_minute=0))
    with pytest.raises(TokenRateLimited):
        refuse_closed_doors(LimitPolicy(tokens_per_minute=0))
    with pytest.raises(TooManyConnections):
        refuse_closed_connections(LimitPolicy(max_connections=0))


def test_longest_wait_wins_first_on_ties() -> None:
    assert longest_wait([]) == (Verdict.ADMITTED, 0)
    assert longest_wait([(Verdict.REQUESTS, 0), (Verdict.TOKENS, 0)]) == (Verdict.ADMITTED, 0)
    assert longest_wait([(Verdict.REQUESTS, 5), (Verdict.TOKENS, 9)]) == (Verdict.TOKENS, 9)
    assert longest_wait([(Verdict.REQUESTS, 9), (Verdict.USER_REQUESTS, 9)]) == (Verdict.REQUESTS, 9)
