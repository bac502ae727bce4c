"""The ``runyard`` command.

Sub-commands: ``up`` (the whole stack), ``serve SERVICE`` (one service),
``migrate``, ``send``, ``chat``, ``sessions list|show|reset|delete``,
``tasks spawn|list|show|cancel`` and ``config check``. Every command takes ``--config FILE`` (default
``$RUNYARD_CONFIG``), before or after the sub-command; client commands reach
the gateway at ``endpoints.gateway`` unless ``--gateway`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from runyard.common.config import Config, ConfigError, load_config
from runyard.sessions.flags import RestartExpectedAction

__all__ = ["main"]

SERVICES = ("gateway", "router", "sessions", "worker")

#: Modules that add sub-commands: each has ``add_parsers(subparsers)``.
COMMAND_MODULES = (
    "runyard.cli.client_commands",
    "runyard.cli.events_commands",
    "runyard.cli.keys_commands",
    "runyard.cli.bench",
    "runyard.cli.status_commands",
    "runyard.cli.router_commands",
    "runyard.cli.tasks_commands",
)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _serve(args: argparse.Namespace) -> int:
    from runyard.common import tls
    from runyard.common.runtime import check_service_config, setup_logging

    config = _load(args)
    check_service_config(config, args.service)
    # Passed down to the service's listeners and internal channels (the
    # internal secret travels in config.auth); ConfigError if a file is unreadable.
    tls_settings = tls.load(config)
    setup_logging(args.service, config)
    _setup_tracing(args.service)
    if args.service == "gateway":
        from runyard.gateway.main import serve
    elif args.service == "router":
        from runyard.router.main import serve
    elif args.service == "sessions":
        from runyard.sessions.main import serve
    else:
        from runyard.worker.main import serve
    try:
        asyncio.run(serve(config, tls=tls_settings))
    finally:
        from runyard.common import tracing

        tracing.shutdown()  # exports the spans still buffered
    return 0


def _setup_tracing(service: str) -> None:
    """OpenTelemetry tracing when OTEL_EXPORTER_OTLP_ENDPOINT is set (runyard.common.tracing)."""
    from runyard.common import tracing

    try:
        tracing.setup(service)
    except ValueError as exc:
        raise ConfigError([("OTEL_EXPORTER_OTLP_PROTOCOL", str(exc))]) from None


def _up(args: argparse.Namespace) -> int:
    from runyard.cli.up import UpOptions, run_up

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    options = UpOptions(
        config_path=args.config,
        data_dir=args.data_dir,
        openai_base_url=args.openai_base_url,
        model=args.model,
        local_model=args.local_model,
        local_model_port=args.local_model_port,
        verbose=args.verbose,
    )
    return asyncio.run(run_up(options))


def _migrate(args: argparse.Namespace) -> int:
    from runyard.common import db
    from runyard.common.runtime import database_url

    config = _load(args)
    url = database_url(config)
    applied = asyncio.run(db.migrate_all(url, progress=lambda line: print(f"  {line}", flush=True)))
    total = sum(len(v) for v in applied.values())
    print(f"{total} migration(s) applied" if total else "database is up to date")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"configuration OK ({args.config or os.environ.get('RUNYARD_CONFIG') or 'built-in defaults'})")
    for agent_id, agent in sorted(config.agents.items()):
        chain = " -> ".join(agent.chain)
        print(f"  agent {agent_id}: {chain}")
    for name, provider in sorted(config.providers.items()):
        print(f"  provider {name}: {provider.type} {provider.base_url}".rstrip())
    return 0


def _accept_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """Let an option of a command follow its sub-commands too: ``runyard config
    check --config FILE`` and ``runyard sessions list --gateway ADDR``, as
    people type them, not only ``runyard --config FILE config check``.

    Each value-taking option of a parser that has sub-commands (``--config``,
    ``--gateway``, ``--api-key``) is added to its sub-commands with a SUPPRESS
    default, so a value given before the sub-command stays.
    """
    for action in parser._actions:  # argparse has no public walk of sub-parsers
        if not isinstance(action, argparse._SubParsersAction):
            continue
        inherited = [a for a in parser._actions if type(a) is argparse._StoreAction and a.option_strings]
        for child in dict.fromkeys(action.choices.values()):
            present = {o for a in child._actions for o in a.option_strings}
            for option in inherited:
                if not present & set(option.option_strings):
                    child.add_argument(
                        *option.option_strings,
                        dest=option.dest,
                        default=argparse.SUPPRESS,
                        type=option.type,
                        choices=option.choices,
                        metavar=option.metavar,
                        help=option.help,
                    )
            _accept_options_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``runyard`` command."""
    from runyard._version import __version__

    parser = argparse.ArgumentParser(prog="runyard", description="runyard: LLM agent conversations over gRPC")
    parser.add_argument("--version", action="version", version=f"runyard {__version__}")
    parser.add_argument("--config", help="TOML config file (default: $RUNYARD_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="run the whole stack locally (embedded PostgreSQL unless RUNYARD_DATABASE_URL)"
    )
    up.add_argument("--data-dir", help="embedded PostgreSQL data directory (database.data_dir)")
    up.add_argument("--openai-base-url", help="point the default agent at this OpenAI-compatible endpoint")
    up.add_argument(
        "--model", help="model name at that endpoint (default: $RUNYARD_MODEL or the first listed)"
    )
    up.add_argument(
        "--local-model",
        action="store_true",
        help="serve SmolLM2-135M with llama.cpp and use it (needs runyard[local-model])",
    )
    up.add_argument("--local-model-port", type=int, default=8088, help="port of the local model server")
    up.add_argument(
        "-v", "--verbose", action="store_true", help="service logs on this terminal instead of files"
    )
    up.add_argument("--restart-expected", action=RestartExpectedAction)
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run one service")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--restart-expected", action=RestartExpectedAction)
    serve.set_defaults(func=_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations (RUNYARD_DATABASE_URL)")
    migrate.set_defaults(func=_migrate)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate the configuration and print every error")
    check.set_defaults(func=_config_check)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parsers(sub)
    _accept_options_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``runyard`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print("invalid configuration:", file=sys.stderr)
        for path, message in exc.problems:
            print(f"  {path}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
