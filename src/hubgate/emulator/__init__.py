"""A local stand-in for Amazon Bedrock runtime, byte-exact on the wire for botocore.

Run it with ``python -m hubgate.emulator --port N`` (or ``serve``) and point an unmodified
aioboto3/botocore ``bedrock-runtime`` client at it with ``endpoint_url``. The gateway never
imports this package. The contract is in docs/emulator.md.
"""

from hubgate.emulator.app import EmulatorConfig, create_app, serve
from hubgate.emulator.script import ExpectedReply, InvalidRequest, Operation, expected_reply

__all__ = [
    "EmulatorConfig",
    "ExpectedReply",
    "InvalidRequest",
    "Operation",
    "create_app",
    "expected_reply",
    "serve",
]
