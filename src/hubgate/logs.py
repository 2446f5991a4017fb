"""Structured logs: one JSON object per line on stdout.

Fields passed with ``extra=`` (request_id, connection_id, tenant, model, code, ...) become keys.
Tokens, prompts and completions are never logged; ``HUBGATE_LOG_TEXT_LENGTHS`` adds text lengths
only. EMF documents (``hubgate.emf``) are written as they are, one per line, for CloudWatch.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from hubgate.settings import Settings

# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key != "color_message":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


# A JWT: three base64url parts, the first two JSON objects (so starting with "eyJ").
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")


class _RedactTokens(logging.Filter):
    """Last line of defence: a library that logs headers at debug level must not leak a token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "eyJ" in message:
            record.msg = _JWT.sub("[token redacted]", message)
            record.args = None
        return True


class _UvicornFilter(logging.Filter):
    """Drops the websockets protocol's debug traces (they hold every frame's text) and the error
    uvicorn logs after every handshake refused with an HTTP response (it is not one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return False
        return "returned without completing handshake" not in record.getMessage()


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once, at process start (the CLI calls this)."""
    handler = logging.StreamHandler(sys.stdout)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # A filter, not a level: uvicorn resets this logger's level from its own configuration.
    logging.getLogger("uvicorn.error").addFilter(_UvicornFilter())
    # Noisy at debug level and may include request bodies: keep the AWS SDK at warning.
    for name in ("botocore", "aiobotocore", "aioboto3", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)

    emf = logging.getLogger("hubgate.emf")
    emf_handler = logging.StreamHandler(sys.stdout)
    emf_handler.setFormatter(logging.Formatter("%(message)s"))
    emf.handlers[:] = [emf_handler]
    emf.propagate = False
    emf.setLevel(logging.INFO)
