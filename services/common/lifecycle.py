"""One service lifecycle: how a service process starts, serves and stops.

:func:`run_service` is the whole life of ``runyard serve SERVICE``. Each
service's ``main.py`` is only its composition root: a ``build`` function that
builds the service's parts, each with its collaborators passed to its
constructor, and registers them with the :class:`Service` it is handed.

Start, for every service:

1. the metrics HTTP server (``<service>.metrics_port``: ``/metrics``,
   ``/healthz``, ``/readyz``; ready answers 503 until step 4), a daemon thread
   that answers until the process exits;
2. ``build(service)``: the database (:meth:`Service.open_database`), channels
   (:meth:`Service.channel`), the parts, started in dependency order, each
   close registered as it starts (:meth:`Service.on_close`,
   :meth:`Service.task`), and the gRPC server with its servicers
   (:meth:`Service.serve`);
3. SIGTERM/SIGINT (and SIGUSR1: a stop that expects a restart) handlers;
4. the server starts: health SERVING;
5. the service's :meth:`Service.on_serving` steps (a ready line; the worker
   starts its MCP servers and takes runs);
6. the objects start-up made are frozen out of the garbage collector
   (:func:`_freeze_startup_objects`); then it serves until a signal.

Stop: ``"<service> shutting down"`` is logged; health NOT_SERVING and new
calls refused (:meth:`ServiceServer.begin_shutdown`); the service's
:meth:`Service.on_drain` steps run in the order they were registered (each
within the timeouts its own config gives it); then everything registered is
closed in the reverse order of registration: the server (with no grace if
the drain did not stop it already), tasks, parts, channels, the database.
A stop still running :data:`SLOW_STOP_MARGIN_S` after the service's
``shutdown_grace_s`` logs a WARNING naming what each task waits on
(:func:`_report_slow_stop`), and :data:`SLOW_STOP_DUMP_DELAY_S` later
every thread's stack goes to stderr (:mod:`faulthandler`: it shows a stuck
event loop too).

Start-up that fails half way (an exception in steps 1 to 5) closes whatever
had been registered, in the same reverse order, logs
``"<service> failed to start (<Error>); closing what had started"`` and
re-raises: ``runyard serve`` exits 2 with the listing of a ``ConfigError``,
1 with the traceback of anything else. A close that raises does not keep the
others from running (:class:`contextlib.AsyncExitStack`).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Protocol

import asyncpg
import grpc

from runyard.common import runtime
from runyard.common.clients import DEFAULT_MAX_MESSAGE_BYTES, InternalChannels
from runyard.common.config import Config
from runyard.common.metrics import serve_metrics
from runyard.common.server import ServiceServer
from runyard.common.tls import TlsSettings

__all__ = ["Build", "ServerSettings", "Service", "Step", "run_service", "server_settings"]

log = logging.getLogger(__name__)

#: A step of start or drain: awaited, its result ignored.
Step = Callable[[], Awaitable[object]]


class ServerSettings(Protocol):
    """The part of a service's config section the lifecycle reads
    (``gateway``, ``router``, ``sessions`` or ``worker``)."""

    @property
    def listen(self) -> str:
        """``host:port`` of the gRPC server (the metrics server binds the same host)."""

    @property
    def metrics_port(self) -> int:
        """Port of the metrics/health HTTP server; 0 = none."""

    @property
    def shutdown_grace_s(self) -> float:
        """Seconds in-flight calls get to finish once a stop begins."""


def server_settings(config: Config, name: str) -> ServerSettings:
    """The config section of service ``name``.

    Raises:
        ValueError: ``name`` is not gateway, router, sessions or worker.
    """
    sections: dict[str, ServerSettings] = {
        "gateway": config.gateway,
        "router": config.router,
        "sessions": config.sessions,
        "worker": config.worker,
    }
    try:
        return sections[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; expected one of {', '.join(sections)}") from None


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it; an exception it ended with propagates."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class Service:
    """One service process while :func:`run_service` builds, serves and stops it.

    ``build`` gets it to open what the service needs and to register how
    each thing stops; nothing is stopped by hand in a ``main.py``.

    Attributes:
        name: ``gateway``, ``router``, ``sessions`` or ``worker``.
        config: the loaded configuration.
        settings: the service's own config section (listen, metrics port, grace).
        tls: the TLS settings of its listeners and internal channels (None = plaintext).
        internal_secret: ``auth.internal_secret``: required on its internal
            listeners and sent on its internal channels.
        channels: how its parts open channels of their own (:class:`InternalChannels`).
    """

    def __init__(
        self,
        name: str,
        config: Config,
        stack: contextlib.AsyncExitStack,
        *,
        tls: TlsSettings | None,
    ):
        self.name = name
        self.config = config
        self.settings = server_settings(config, name)
        self.tls = tls
        self.internal_secret = config.auth.internal_secret
        self.channels = InternalChannels(tls, self.internal_secret)
        self._stack = stack
        self._server: ServiceServer | None = None
        self._serving: list[Step] = []
        self._drain: list[Step] = []

    # ------------------------------------------------------------ registering

    def on_close(self, close: Callable[[], Awaitable[object]]) -> None:
        """Await ``close()`` when the service ends (also after a failed
        start), before whatever was registered earlier."""
        self._stack.push_async_callback(close)

    def on_exit(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error)`` when the service ends, at this point of
        the reverse order; ``error`` is the exception ending it (a failed
        start or drain), None after a clean stop. It cannot stop the
        exception."""

        def exit_callback(
            exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> bool:
            callback(exc)
            return False

        self._stack.push(exit_callback)

    def on_serving(self, step: Step) -> None:
        """Await ``step()`` once the server is SERVING, before waiting for a
        stop signal (steps run in registration order; one that raises is a
        failed start)."""
        self._serving.append(step)

    def on_drain(self, step: Step) -> None:
        """Await ``step()`` when a stop begins, after health went NOT_SERVING
        (steps run in registration order, before anything is closed)."""
        self._drain.append(step)

    def task(
        self,
        coroutine: Coroutine[Any, Any, None],
        *,
        name: str,
        stop: Callable[[asyncio.Task[None]], Awaitable[None]] | None = None,
    ) -> asyncio.Task[None]:
        """Run ``coroutine`` as a background task until the service ends, then
        ``await stop(task)`` (default: cancel it and wait; an exception the
        task ended with propagates)."""
        task = asyncio.create_task(coroutine, name=name)
        self._stack.push_async_callback(stop or _cancel, task)
        return task

    # ------------------------------------------------------------ opening

    async def open_database(self, schema: str) -> asyncpg.Pool:
        """The service's pool (:func:`runyard.common.runtime.open_database`:
        waits for PostgreSQL, applies ``schema``'s migrations); closed when
        the service ends.

        Raises:
            ConfigError: no ``database.url``.
            OSError, asyncpg.PostgresError: PostgreSQL stayed unreachable or a
                migration failed.
        """
        pool = await runtime.open_database(self.config, schema)
        self.on_close(pool.close)
        return pool

    def channel(
        self, address: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> grpc.aio.Channel:
        """An internal channel to ``address`` (``host:port``) with this
        process's TLS and internal secret; closed when the service ends."""
        channel = self.channels.open(address, max_message_bytes=max_message_bytes)
        self.on_close(channel.close)
        return channel

    def serve(
        self,
        service_names: Iterable[str],
        *,
        public: bool = False,
        internal_listen: str = "",
        internal_service_names: Iterable[str] = (),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> ServiceServer:
        """The service's gRPC server (:class:`ServiceServer`) on
        ``settings.listen``, with this process's TLS and internal secret; the
        caller adds its servicers to it. :func:`run_service` starts it after
        ``build``; it is stopped (with no grace, unless a drain step stopped
        it before) when the service ends.

        Raises:
            RuntimeError: called twice.
        """
        if self._server is not None:
            raise RuntimeError(f"{self.name} has a server already")
        server = ServiceServer(
            self.name,
            self.settings.listen,
            service_names,
            shutdown_grace_s=self.settings.shutdown_grace_s,
            max_message_bytes=max_message_bytes,
            public=public,
            internal_listen=internal_listen,
            internal_service_names=internal_service_names,
            internal_secret=self.internal_secret,
            tls=self.tls,
        )
        self._stack.push_async_callback(server.stop, 0)
        self._server = server
        return server

    @property
    def server(self) -> ServiceServer:
        """The server :meth:`serve` made.

        Raises:
            RuntimeError: ``build`` made none.
        """
        if self._server is None:
            raise RuntimeError(f"{self.name}: build() made no server (Service.serve)")
        return self._server


def _freeze_startup_objects() -> None:
    """Collect start-up's garbage, then move every object left (modules,
    descriptors, configuration, clients: about 75 000 per service here) to the
    collector's permanent generation (:func:`gc.freeze`), so that the full
    collections a busy service makes now and then do not walk them again.

    Measured with ``runyard bench stack`` (N = 8 and 32): the longest full
    collection of each service was 42 (gateway), 42 (router), 84 (sessions)
    and 64 ms (worker), each a pause of every call in flight; with the
    freeze, 3-8 ms. Cyclic garbage among frozen objects is never collected,
    which is why start-up's garbage is collected first; objects freed by
    reference counting are freed as always.
    (https://docs.python.org/3/library/gc.html#gc.freeze)
    """
    gc.collect()
    gc.freeze()


#: A stop still running this long after its drain grace (``shutdown_grace_s``)
#: is reported (:func:`_report_slow_stop`).
SLOW_STOP_MARGIN_S = 3.0
#: ... and this long after that report, every thread's stack is dumped to
#: stderr by :func:`faulthandler.dump_traceback_later`, from a thread of its
#: own: it shows where a stop hangs even when the event loop itself is stuck
#: (and the report above could not run).
SLOW_STOP_DUMP_DELAY_S = 1.0


def _awaiting(task: asyncio.Task[Any]) -> str:
    """Where ``task`` is suspended: its chain of awaits, outermost first
    (``function (file:line) > ...``), down to the future it waits on."""
    links: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:  # a future, a generator-based awaitable, or a finished coroutine
            links.append(type(awaited).__name__)
            break
        code = frame.f_code
        links.append(f"{code.co_qualname} ({code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno})")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return " > ".join(links)


def _report_slow_stop(name: str, after_s: float) -> None:
    """Log (WARNING) that service ``name`` is still stopping ``after_s``
    seconds after its signal, with what each of its tasks waits on: a drain
    or close that hangs names itself before an orchestrator's SIGKILL
    (Kubernetes: ``terminationGracePeriodSeconds``) ends the process."""
    waits = {task.get_name(): _awaiting(task) for task in asyncio.all_tasks()}
    # gRPC's own server loops (Cython, `*.pyx.pxi`) wait for calls in any state: left out.
    ours = sorted((task, chain) for task, chain in waits.items() if ".pxi:" not in chain.split(" > ")[0])
    listing = "\n".join(f"  {task}: {chain}" for task, chain in ours)
    log.warning(
        "%s still shutting down after %.1f s; its tasks wait on (%d of gRPC's own left out):\n%s",
        name,
        after_s,
        len(waits) - len(ours),
        listing,
    )


#: A service's composition root: builds and registers its parts on the :class:`Service`.
Build = Callable[[Service], Awaitable[None]]


async def run_service(name: str, config: Config, build: Build, *, tls: TlsSettings | None) -> None:
    """Run service ``name`` until SIGTERM/SIGINT/SIGUSR1, then drain and close
    it (see the module docstring for the order).

    Args:
        name: ``gateway``, ``router``, ``sessions`` or ``worker`` (its config
            section gives listen, metrics port and shutdown grace).
        config: the loaded, checked configuration
            (:func:`runyard.common.runtime.check_service_config`).
        build: the composition root (``main.py``).
        tls: TLS of the service's listeners and internal channels
            (:func:`runyard.common.tls.load`); None = plaintext.

    Raises:
        ValueError: ``name`` is not a service.
        Exception: whatever a failed start, drain step or close raised, after
            everything registered was closed.
    """
    slow_stop: asyncio.TimerHandle | None = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            service = Service(name, config, stack, tls=tls)
            host = service.settings.listen.rsplit(":", 1)[0] or "0.0.0.0"
            try:
                serve_metrics(service.settings.metrics_port, host)
                await build(service)
                server = service.server
                server.install_signal_handlers()
                await server.start()
                for step in service._serving:
                    await step()
                _freeze_startup_objects()
            except BaseException as exc:
                log.error("%s failed to start (%s); closing what had started", name, type(exc).__name__)
                raise
            await server.stop_requested.wait()
            log.info("%s shutting down", name)
            report_after_s = service.settings.shutdown_grace_s + SLOW_STOP_MARGIN_S
            slow_stop = asyncio.get_running_loop().call_later(
                report_after_s, _report_slow_stop, name, report_after_s
            )
            faulthandler.dump_traceback_later(report_after_s + SLOW_STOP_DUMP_DELAY_S, exit=False)
            await server.begin_shutdown()
            for step in service._drain:
                await step()
    finally:
        if slow_stop is not None:  # the stop, closes included, is over
            slow_stop.cancel()
            faulthandler.cancel_dump_traceback_later()
