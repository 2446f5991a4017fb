"""``python -m hubgate.emulator``: run the Bedrock runtime emulator with uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from hubgate.emulator.app import EmulatorConfig, serve


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hubgate.emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="pause before the first token")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="pause before each later token")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    try:
        config = EmulatorConfig(ttft_ms=args.ttft_ms, token_delay_ms=args.token_delay_ms)
    except ValueError as exc:
        parser.error(str(exc))
    serve(args.host, args.port, config, log_level=args.log_level)


if __name__ == "__main__":
    main()
