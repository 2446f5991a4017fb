"""hubgate: a multi-tenant WebSocket gateway that streams Amazon Bedrock replies."""

__version__ = "0.1.0"
