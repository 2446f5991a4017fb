"""Redis key naming shared by every store: one hash tag per tenant, and request claims.

Every key of a tenant (limiter buckets and leases, resume buffers, usage aggregates, sessions)
starts with ``{t:<tenant>}``, so all of them hash to one Redis Cluster slot and one script may
touch several (Redis Cluster and ElastiCache Serverless refuse multi-key scripts across slots).
"""

from __future__ import annotations

from dataclasses import dataclass


def tenant_tag(tenant: str) -> str:
    """``{t:<tenant>}``; braces (and ``%``) in a tenant id are escaped so it cannot end the tag early."""
    safe = tenant.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return f"{{t:{safe}}}"


@dataclass(frozen=True, slots=True)
class Claim:
    """A key that names one request, created by the admission that lets the request through.

    A backend that keeps its state where the key lives (Redis) checks and creates it in the same
    step as the admission: a request whose key already exists is refused with DuplicateId and
    charged nothing. Other backends leave it alone (``Admission.claimed`` is then false) and the
    caller creates the key itself. The key must share the tenant's hash tag (``tenant_tag``).

    The key holds ``owner`` (the request's own mark, e.g. its lease): a key that already holds the
    same owner is not a duplicate, so an admission retried after a timeout, or a creation by the
    caller after the limiter fell back, still finds the request its own.
    """

    key: str
    ttl_ms: int
    owner: str
