"""``runyard keys create|list|revoke``: API keys of the public API.

Works on the gateway's schema directly (``RUNYARD_DATABASE_URL``, or the
embedded database of ``runyard up``), like ``createuser`` does for PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from runyard.cli.up import database_url_for_cli
from runyard.common import db
from runyard.common.config import load_config
from runyard.common.errors import RunyardError
from runyard.gateway.keys import VALID_SCOPES, ApiKeyStore

__all__ = ["add_parsers"]


async def _keys(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    url = database_url_for_cli(config)
    await db.migrate(url, "gateway")
    pool = await db.create_pool(url, min_size=1, max_size=2)
    store = ApiKeyStore(pool)
    try:
        if args.keys_command == "create":
            key, token = await store.create(args.org, args.name or "", args.scope or ["chat"])
            print(token)
            print(
                f"created key {key.key_id} for org {key.org_id!r} with scopes "
                f"{', '.join(sorted(key.scopes))}; "
                "store it now, it is not shown again",
                file=sys.stderr,
            )
        elif args.keys_command == "list":
            keys = await store.list(args.org)
            for key in keys:
                state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                print(
                    f"{key.key_id}  {key.org_id:<16} {','.join(sorted(key.scopes)):<40} {key.name:<20} "
                    f"{state}"
                )
            if not keys:
                print("no API keys", file=sys.stderr)
        elif args.keys_command == "revoke":
            key = await store.revoke(args.key_id)
            print(f"revoked {key.key_id} (org {key.org_id})")
    except RunyardError as exc:
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await pool.close()
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``keys`` to the ``runyard`` parser."""
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--org", required=True, help="the org the key acts for")
    create.add_argument("--name", help="a label")
    create.add_argument(
        "--scope", action="append", choices=sorted(VALID_SCOPES), help="repeatable; default: chat"
    )
    lst = ksub.add_parser("list", help="list API keys (never their secrets)")
    lst.add_argument("--org")
    revoke = ksub.add_parser("revoke", help="revoke a key on every gateway at once")
    revoke.add_argument("key_id")
    keys.set_defaults(func=lambda a: asyncio.run(_keys(a)))
    # Offline, no database: the run-token key pair (docs/security.md).
    pair = ksub.add_parser(
        "run-token",
        help="print a new Ed25519 key pair for run tokens: the private key for the gateway only, "
        "the public key for every service",
    )
    pair.set_defaults(func=_run_token_keys)


def _run_token_keys(args: argparse.Namespace) -> int:
    """Print ``RUNYARD_RUN_TOKEN_PRIVATE_KEY=...`` and ``RUNYARD_RUN_TOKEN_PUBLIC_KEY=...``."""
    from runyard.common.auth import generate_run_token_keys

    private, public = generate_run_token_keys()
    print(f"RUNYARD_RUN_TOKEN_PRIVATE_KEY={private}")
    print(f"RUNYARD_RUN_TOKEN_PUBLIC_KEY={public}")
    print("give the private key to the gateway only; every service gets the public key", file=sys.stderr)
    return 0
