"""The import rules of docs/architecture.md, checked on the source: which
room (package of ``runyard``) may import which, and that the public client
loads nothing of the server stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SERVICES = Path(__file__).parents[2] / "services"

SERVICE_ROOMS = ("gateway", "router", "sessions", "worker")

#: room -> the rooms it may import (besides itself). ``""`` is the package
#: root (``import runyard``, ``from runyard import X``).
ALLOWED: dict[str, set[str]] = {
    "_proto": set(),
    "_version": set(),
    "common": {"_proto", "_version"},
    # The public surface: the client and the contract.
    "": {"_proto", "_version", "client", "common"},
    "client": {"_proto", "_version", "common"},
    "v1": {"_proto"},
    **{room: {"_proto", "_version", "common"} for room in SERVICE_ROOMS},
    # Benchmarks drive services and the client; they never need the CLI.
    "bench": {"", "_proto", "_version", "client", "common", *SERVICE_ROOMS},
    # The `runyard` command may import anything.
    "cli": {"", "_proto", "_version", "bench", "client", "common", "v1", *SERVICE_ROOMS},
    "__main__": {"cli"},
}

#: What the public client (``import runyard``, ``runyard.client``) may load of runyard's own modules.
CLIENT_MODULES = {
    "runyard",
    "runyard._version",
    "runyard.client",
    "runyard.v1",
    "runyard.common",
    "runyard.common.channels",
    "runyard.common.config",
    "runyard.common.errors",
    "runyard.common.tls",
    "runyard.common.tracing",
}
#: ... and never these (servers, health and reflection services, metrics, the database, tokens).
SERVER_STACK = (
    "asyncpg",
    "grpc_health.v1.health",
    "grpc_reflection.v1alpha.reflection",
    "jwt",
    "prometheus_client",
    "protovalidate",
)


def _room(module: str) -> str:
    """``runyard.gateway.tasks.model`` -> ``gateway``; ``runyard`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``runyard`` module ``path`` imports (also inside functions and TYPE_CHECKING)."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "runyard"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "runyard":
                # `from runyard import X`: X is a room (`from runyard import v1`) or a name of the root.
                for alias in node.names:
                    sub = f"runyard.{alias.name}"
                    is_module = (SERVICES / alias.name).is_dir() or (SERVICES / f"{alias.name}.py").exists()
                    found.append((node.lineno, sub if is_module else "runyard"))
            elif node.module.split(".")[0] == "runyard":
                found.append((node.lineno, node.module))
    return found


def _module_of(path: Path) -> str:
    parts = path.relative_to(SERVICES).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("runyard", *parts))


def test_each_room_imports_only_the_rooms_below_it():
    """Services never import each other (they talk over gRPC through the
    protos), nor the CLI, the benchmarks or the package root; the shared
    layer imports no service; benchmarks never import the CLI."""
    problems = []
    for path in sorted(SERVICES.rglob("*.py")):
        module = _module_of(path)
        room = _room(module)
        if room == "_proto":
            continue
        for line, imported in _imports(path):
            target = _room(imported)
            if target != room and target not in ALLOWED[room]:
                where = f"{path.relative_to(SERVICES.parent)}:{line}"
                problems.append(f"{where}: {room or 'runyard'} imports {imported}")
    assert problems == []


def test_the_rules_know_every_room():
    rooms = {p.name for p in SERVICES.iterdir() if p.is_dir() and not p.name.startswith("__")}
    rooms |= {p.stem for p in SERVICES.glob("*.py") if p.stem != "__init__"}
    assert rooms == set(ALLOWED) - {""}


def test_the_public_client_loads_nothing_of_the_server_stack():
    script = "import json, sys, runyard, runyard.client, runyard.v1; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = set(json.loads(result.stdout))
    ours = {m for m in loaded if m == "runyard" or m.startswith("runyard.")}
    assert {m for m in ours if not m.startswith("runyard._proto")} - CLIENT_MODULES == set()
    assert [m for m in SERVER_STACK if m in loaded] == []


def test_a_worker_without_mcp_servers_never_imports_the_mcp_sdk():
    # About 0.9 s of CPU at every worker start (and tens of MB) that only MCP servers need.
    script = (
        "import json, sys, runyard.worker.main, runyard.worker.mcp as m;"
        "from runyard.common.config import Config;"
        "m.McpTools(Config());"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = set(json.loads(result.stdout))
    assert sorted(m for m in loaded if m.split(".")[0] in ("mcp", "mcp_types")) == []


def test_the_version_has_one_source():
    """pyproject reads it from runyard._version; no module takes it from the package root."""
    import runyard
    from runyard._version import __version__

    assert runyard.__version__ == __version__
    for path in SERVICES.rglob("*.py"):
        assert "from runyard import __version__" not in path.read_text(), path
