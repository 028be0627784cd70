"""``kfast`` command line.

    kfast run pipeline.toml [--plan] [--log-level INFO] [--health-port N [--health-host H]]
    kfast replay DLQ_TOPIC ...          (see kfast.cli.replay)

The TOML file's fields are described in :mod:`kfast.cli.config`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kfast._version import __version__
from kfast.cli import replay
from kfast.cli.config import build_pipeline, load_pipeline
from kfast.errors import ConfigError, KfastError
from kfast.prometheus import serve

__all__ = ["build_pipeline", "load_pipeline", "main"]


def _run(ns: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, ns.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    pipe = load_pipeline(ns.config)
    if ns.plan:
        print(pipe.memory_plan().describe())
        return 0
    server = None
    try:
        if ns.health_port is not None:
            try:
                server = serve(pipe, ns.health_port, host=ns.health_host)
            except OSError as e:
                raise ConfigError(f"--health-port {ns.health_port}: {e}") from e
        pipe.run()
    finally:
        if server is not None:
            server.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``kfast``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "replay":
        return int(replay.main(args[1:]))
    parser = argparse.ArgumentParser(prog="kfast", description="kfast: bounded Kafka pipelines")
    parser.add_argument("--version", action="version", version=f"kfast {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a pipeline described by a TOML file")
    run.add_argument("config", help="pipeline.toml")
    run.add_argument("--plan", action="store_true", help="print the memory plan and exit")
    run.add_argument("--log-level", default="INFO")
    run.add_argument(
        "--health-port",
        type=int,
        help="serve /healthz, /readyz (and /metrics) on this port while the pipeline runs",
    )
    run.add_argument(
        "--health-host",
        default="127.0.0.1",
        help="address for --health-port (0.0.0.0 for probes from outside the host or pod)",
    )
    sub.add_parser("replay", help="re-publish dead letters (see 'kfast replay --help')")
    ns = parser.parse_args(args)
    try:
        if ns.cmd == "run":
            return _run(ns)
    except ConfigError as e:
        print(f"kfast: configuration error: {e}", file=sys.stderr)
        return 2
    except KfastError as e:
        print(f"kfast: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
