"""The ``bazaar`` command: one entry point, a subcommand per process or tool.

Each subcommand imports what it needs when it runs, so ``bazaar model-server`` in a pod
never loads the gateway's or the autoscaler's dependencies.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bazaar", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser("model-server", help="serve a model repository (one pod)")
    server.add_argument("--model-repository", type=Path, required=True, metavar="DIR")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8001)
    server.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="load only this model (repeatable; default: every model in the repository)",
    )
    server.set_defaults(run=_model_server)

    models = commands.add_parser("models", help="model repository tools")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    build = models_commands.add_parser("build-demo", help="build the demo repository offline")
    build.add_argument("directory", type=Path, metavar="DIR")
    build.set_defaults(run=_build_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.run(args))


def _model_server(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.errors import ConfigError
    from models.repository import ModelRepository
    from models.server import create_app
    from models.store import ModelStore

    try:
        repository = ModelRepository(args.model_repository)
    except ConfigError as exc:
        logging.getLogger("bazaar").error("%s", exc)
        return 2
    app = create_app(ModelStore(repository, args.models))
    logging.getLogger("bazaar").info(
        "model server for %s on http://%s:%d", repository.root, args.host, args.port
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _build_demo(args: argparse.Namespace) -> int:
    from models.demo import build_demo_repository

    names = build_demo_repository(args.directory)
    print(f"built demo repository {args.directory}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
