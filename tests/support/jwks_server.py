"""Signing keys and a real JWKS endpoint on a free loopback port, for tests.

``RsaKeySet`` holds an RSA-2048 key and an EC P-256 key (more RSA keys can be added to simulate
rotation) and mints tokens with them. ``JwksServer`` serves the set's public JWKS over HTTP at
``/.well-known/jwks.json``, counts requests, and can be told to fail with a status, serve garbage,
or stop listening and come back on the same port.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.support.redis_server import free_port

JWKS_PATH = "/.well-known/jwks.json"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class RsaKeySet:
    """Private keys by kid: ``rsa_kid`` (RS256) and ``ec_kid`` (ES256), plus any added later."""

    def __init__(self, rsa_kid: str = "rsa-1", ec_kid: str = "ec-1") -> None:
        self.rsa_kid = rsa_kid
        self.ec_kid = ec_kid
        self._keys: dict[str, tuple[str, PrivateKey]] = {}
        self._lock = threading.Lock()
        self.add_rsa_key(rsa_kid)
        self._keys[ec_kid] = ("ES256", ec.generate_private_key(ec.SECP256R1()))

    def add_rsa_key(self, kid: str) -> None:
        """Add (publish) another RS256 key, as an issuer does before rotating to it."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        with self._lock:
            self._keys[kid] = ("RS256", key)

    def remove_key(self, kid: str) -> None:
        """Stop publishing ``kid``."""
        with self._lock:
            del self._keys[kid]

    def _default_kid(self, alg: str) -> str:
        return self.ec_kid if alg.startswith("ES") else self.rsa_kid

    def mint(self, claims: Mapping[str, Any], *, kid: str | None = None, alg: str = "RS256") -> str:
        """A token with ``kid`` in its header, signed by ``kid``'s key when that key is for ``alg``.

        Otherwise the set's default key for ``alg`` signs it: that is how a test produces a
        well-signed token with an unknown kid, or an RS256 header naming the EC key.
        """
        header_kid = kid or self._default_kid(alg)
        with self._lock:
            entry = self._keys.get(header_kid)
            if entry is None or entry[0] != alg:
                entry = self._keys[self._default_kid(alg)]
        return jwt.encode(dict(claims), entry[1], algorithm=alg, headers={"kid": header_kid})

    def public_pem(self, kid: str | None = None) -> bytes:
        """The PEM public key for ``kid`` (default: the RSA key), e.g. for algorithm-confusion tests."""
        with self._lock:
            key = self._keys[kid or self.rsa_kid][1]
        return key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set, with ``kid``, ``alg`` and ``use`` on each key as Cognito publishes them."""
        with self._lock:
            entries = list(self._keys.items())
        keys = []
        for kid, (alg, private) in entries:
            if isinstance(private, rsa.RSAPrivateKey):
                jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
            else:
                jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": keys}


class JwksServer:
    """An HTTP server in a thread serving ``keyset.jwks()`` on 127.0.0.1.

    The port is reserved at construction, so ``url`` is known before ``start()`` (a test can point
    a verifier at a server that is down) and stays the same across ``stop()``/``start()``.
    """

    def __init__(self, keyset: RsaKeySet, port: int | None = None) -> None:
        self.keyset = keyset
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}{JWKS_PATH}"
        self._lock = threading.Lock()
        self._requests = 0
        self._status = 200
        self._garbage = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        """How many HTTP requests reached the server (any path, any outcome)."""
        with self._lock:
            return self._requests

    def fail(self, status: int = 500) -> None:
        """Answer every request with ``status`` until ``recover()``."""
        with self._lock:
            self._status = status

    def serve_garbage(self) -> None:
        """Answer 200 with a body that is not JSON until ``recover()``."""
        with self._lock:
            self._garbage = True

    def recover(self) -> None:
        with self._lock:
            self._status = 200
            self._garbage = False

    def _respond(self, path: str) -> tuple[int, bytes]:
        with self._lock:
            self._requests += 1
            status, garbage = self._status, self._garbage
        if status != 200:
            return status, b'{"message": "unavailable"}'
        if path != JWKS_PATH:
            return 404, b'{"message": "not found"}'
        if garbage:
            return 200, b"<html>not a key set</html>"
        return 200, json.dumps(self.keyset.jwks()).encode()

    def start(self) -> None:
        """Listen on ``port`` (again, after a ``stop()``)."""
        if self._server is not None:
            return
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = owner._respond(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        # A short poll interval keeps stop() (and so each test's teardown) at ~20 ms instead of 0.5 s.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="jwks-server", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: connections to ``url`` are refused until ``start()``."""
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
