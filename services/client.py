"""A thin async client of the runyard gateway (what the CLI uses).

Example::

    async with Client("127.0.0.1:50051") as client:
        async for event in client.send("demo", "hello"):
            if event.HasField("text_delta"):
                print(event.text_delta.text, end="")

Errors come back as :class:`runyard.RunyardError` subclasses with the
server's code, reason and metadata.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Any, cast

import grpc

from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from runyard.common import tracing
from runyard.common.channels import open_channel
from runyard.common.errors import from_rpc_error
from runyard.common.tls import TlsSettings

__all__ = ["Client"]


class Client:
    """Async gateway client.

    Args:
        address: ``host:port`` of a gateway.
        api_key: sent as ``authorization: Bearer <key>`` when given.
        tls: the gateway's CA (and a client certificate, for a gateway that
            requires one), e.g. ``runyard.common.tls.load(config)``; None =
            plaintext.

    The channel never carries the services' internal secret.
    """

    def __init__(self, address: str, *, api_key: str = "", tls: TlsSettings | None = None):
        self.address = address
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        # Tracing interceptors (none when tracing is off) put `traceparent` in the call's metadata.
        self._channel = open_channel(address, tls=tls, interceptors=tracing.client_interceptors())
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _stream(
        self, call: grpc.aio.UnaryStreamCall[Any, common_pb2.RunEvent]
    ) -> AsyncIterator[common_pb2.RunEvent]:
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def send(
        self,
        session_key: str,
        text: str,
        *,
        agent_id: str = "",
        idempotency_key: str = "",
        strategy: int = common_pb2.MULTITASK_STRATEGY_UNSPECIFIED,
        metadata: dict[str, str] | None = None,
        timeout_s: float | None = None,
        model: str = "",
        client_tools: Sequence[common_pb2.ToolDefinition] = (),
    ) -> AsyncIterator[common_pb2.RunEvent]:
        """Send a message and stream the run's events until it ends.

        ``model`` (``"provider/model"``) replaces the agent's primary model for
        this run (``ModelPreferences.model``); empty means the agent's chain.
        ``client_tools`` are tools the caller answers: the stream then shows
        a ``requires_action`` event and waits for :meth:`submit_tool_results`.
        """
        request = gateway_pb2.SendMessageRequest(
            session_key=session_key,
            agent_id=agent_id,
            text=text,
            idempotency_key=idempotency_key,
            multitask_strategy=cast(common_pb2.MultitaskStrategy, strategy),
            metadata=metadata or {},
            model=common_pb2.ModelPreferences(model=model),
        )
        if client_tools:
            request.options.client_tools.extend(client_tools)
        return self._stream(self.stub.SendMessage(request, metadata=self._metadata, timeout=timeout_s))

    async def submit_tool_results(
        self, run_id: str, results: Sequence[gateway_pb2.ToolOutput], timeout_s: float | None = 30.0
    ) -> common_pb2.Run:
        """Answer client tool calls of a run in ``requires_action``; returns
        the run afterwards (still REQUIRES_ACTION while calls remain)."""
        request = gateway_pb2.SubmitToolResultsRequest(run_id=run_id, results=results)
        response = await self.unary("SubmitToolResults", request, timeout_s)
        return response.run  # type: ignore[attr-defined,no-any-return]

    def chat(self, requests: AsyncIterable[gateway_pb2.ChatRequest]) -> AsyncIterator[common_pb2.RunEvent]:
        """The bidirectional ``Chat`` stream: the events of every run it sends or joins."""
        call = self.stub.Chat(requests, metadata=self._metadata)

        async def events() -> AsyncIterator[common_pb2.RunEvent]:
            try:
                async for event in call:
                    yield event
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            finally:
                call.cancel()

        return events()

    def join(self, run_id: str, after_seq: int = 0) -> AsyncIterator[common_pb2.RunEvent]:
        """Every event of a run after ``after_seq``, then live."""
        request = gateway_pb2.JoinRunRequest(run_id=run_id, after_seq=after_seq)
        return self._stream(self.stub.JoinRun(request, metadata=self._metadata))

    async def unary(self, method: str, request: object, timeout_s: float | None = 30.0) -> object:
        """Call a unary GatewayService method by name (``"GetSession"``, ...)."""
        try:
            return await getattr(self.stub, method)(request, metadata=self._metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
