"""The worker's side of batches (runyard.common.batches), against a gateway
and a router of our own on real gRPC streams: the worker handles each
message of a gateway's batch as if it had come alone, sends several waiting
messages as one only to a gateway whose welcome says it reads them, and
reads the responses of a router's ``GenerateBatch`` in order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from runyard._proto.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    worker_hub_pb2,
    worker_hub_pb2_grpc,
)
from runyard.common.batches import MAX_BATCH_BYTES
from runyard.worker.main import Worker
from tests.support import serving
from tests.support.worker import execute_run, running_worker

pytestmark = pytest.mark.timeout(30)


class _Gateway(worker_hub_pb2_grpc.WorkerHubServiceServicer):
    """A hub that welcomes a worker, then sends what the test queues and
    records what the worker sends."""

    def __init__(self, max_batch_bytes: int):
        self.max_batch_bytes = max_batch_bytes
        self.hellos: list[worker_hub_pb2.WorkerHello] = []
        self.received: asyncio.Queue[worker_hub_pb2.ConnectRequest] = asyncio.Queue()
        self.outgoing: asyncio.Queue[worker_hub_pb2.ConnectResponse | None] = asyncio.Queue()

    async def Connect(  # noqa: N802 - the gRPC method's name
        self, request_iterator: AsyncIterator[worker_hub_pb2.ConnectRequest], context: object
    ) -> AsyncIterator[worker_hub_pb2.ConnectResponse]:
        requests = aiter(request_iterator)
        self.hellos.append((await anext(requests)).hello)
        yield worker_hub_pb2.ConnectResponse(
            welcome=worker_hub_pb2.HubWelcome(
                gateway_id="gw",
                heartbeat_interval_ms=60_000,
                lease_ms=60_000,
                max_batch_bytes=self.max_batch_bytes,
            )
        )

        async def read() -> None:
            async for message in requests:
                self.received.put_nowait(message)

        reader = asyncio.create_task(read())
        try:
            while (message := await self.outgoing.get()) is not None:
                yield message
        finally:
            reader.cancel()

    async def next_messages(self) -> list[worker_hub_pb2.ConnectRequest]:
        """The worker's next stream message, as the messages it carries."""
        message = await asyncio.wait_for(self.received.get(), 10)
        return list(message.batch.messages) if message.HasField("batch") else [message]


@pytest.fixture
async def connected(request: pytest.FixtureRequest) -> AsyncIterator[tuple[_Gateway, Worker]]:
    """A real worker connected to ``_Gateway(max_batch_bytes=request.param)``.
    The sessions service and the router are unreachable: a run the worker
    takes is handed back (``released``) at once."""
    gateway = _Gateway(request.param)
    async with (
        serving(worker_hub_pb2_grpc.add_WorkerHubServiceServicer_to_server, gateway) as address,
        running_worker(address, {"dependency_retry_s": 0}) as (worker, _),
    ):
        await asyncio.wait_for(worker.connected.wait(), 10)
        yield gateway, worker


def _heartbeats(count: int) -> Iterator[worker_hub_pb2.ConnectRequest]:
    for free in range(count):
        yield worker_hub_pb2.ConnectRequest(heartbeat=worker_hub_pb2.WorkerHeartbeat(free_capacity=free))


def _assign(run_id: str) -> worker_hub_pb2.ConnectResponse:
    payload = common_pb2.RunPayload(
        run_id=run_id, org_id="org", session_id=str(uuid.uuid4()), agent_id="default", run_token="t"
    )
    return worker_hub_pb2.ConnectResponse(assign=worker_hub_pb2.RunAssignment(payload=payload))


@pytest.mark.parametrize("connected", [MAX_BATCH_BYTES], indirect=True)
async def test_each_message_of_a_gateways_batch_is_handled_and_waiting_messages_go_back_as_one(connected):
    gateway, worker = connected
    assert gateway.hellos[0].max_batch_bytes == MAX_BATCH_BYTES  # the worker reads batches

    runs = [str(uuid.uuid4()), str(uuid.uuid4())]
    gateway.outgoing.put_nowait(
        worker_hub_pb2.ConnectResponse(batch=worker_hub_pb2.HubBatch(messages=[_assign(r) for r in runs]))
    )
    results: list[worker_hub_pb2.WorkerRunResult] = []
    while len(results) < len(runs):
        results += [m.result for m in await gateway.next_messages() if m.HasField("result")]
    # Both assignments were taken (and, with no sessions service here, handed back).
    assert sorted(r.run_id for r in results) == sorted(runs)
    assert all(r.HasField("released") for r in results)

    for message in _heartbeats(3):  # three messages waiting at once
        worker._send(message)
    sent = await asyncio.wait_for(gateway.received.get(), 10)
    assert sent.HasField("batch")
    assert [m.heartbeat.free_capacity for m in sent.batch.messages] == [0, 1, 2]

    # A drain inside a batch ends the connection like one alone: the worker connects again.
    gateway.outgoing.put_nowait(
        worker_hub_pb2.ConnectResponse(
            batch=worker_hub_pb2.HubBatch(
                messages=[worker_hub_pb2.ConnectResponse(drain=worker_hub_pb2.HubDrain())]
            )
        )
    )
    for _ in range(100):
        if len(gateway.hellos) == 2:
            break
        await asyncio.sleep(0.05)
    assert len(gateway.hellos) == 2


@pytest.mark.parametrize("connected", [0], indirect=True)
async def test_a_gateway_that_reads_no_batches_gets_every_message_alone(connected):
    gateway, worker = connected

    for message in _heartbeats(3):
        worker._send(message)

    sent = [await asyncio.wait_for(gateway.received.get(), 10) for _ in range(3)]
    assert [m.WhichOneof("message") for m in sent] == ["heartbeat"] * 3
    assert [m.heartbeat.free_capacity for m in sent] == [0, 1, 2]


@pytest.mark.parametrize("connected", [7], indirect=True)
async def test_the_worker_keeps_its_batches_within_the_gateways_limit(connected):
    gateway, worker = connected
    sizes = [message.ByteSize() for message in _heartbeats(3)]
    assert sizes == [2, 4, 4]  # the first two fit in 7 bytes, the third does not

    for message in _heartbeats(3):
        worker._send(message)

    first = await asyncio.wait_for(gateway.received.get(), 10)
    second = await asyncio.wait_for(gateway.received.get(), 10)
    assert [m.heartbeat.free_capacity for m in first.batch.messages] == [0, 1]
    assert not second.HasField("batch") and second.heartbeat.free_capacity == 2


class _Router(router_pb2_grpc.RouterServiceServicer):
    """A router whose whole answer was ready at once: one ``GenerateBatch``."""

    def __init__(self) -> None:
        self.requests: list[router_pb2.GenerateRequest] = []

    async def Generate(  # noqa: N802 - the gRPC method's name
        self, request: router_pb2.GenerateRequest, context: object
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        self.requests.append(request)
        answer = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Hello", model="p/m")
        responses = [
            router_pb2.GenerateResponse(model_select=common_pb2.ModelSelect(model="p/m")),
            router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text="Hel")),
            router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text="lo")),
            router_pb2.GenerateResponse(usage=common_pb2.Usage(input_tokens=5, output_tokens=2)),
            router_pb2.GenerateResponse(
                final=router_pb2.GenerateFinal(
                    message=answer, model="p/m", usage=common_pb2.Usage(input_tokens=5, output_tokens=2)
                )
            ),
        ]
        yield router_pb2.GenerateResponse(batch=router_pb2.GenerateBatch(responses=responses))


async def test_the_worker_asks_the_router_for_batches_and_reads_each_response_in_order():
    router = _Router()
    outcome, events = await execute_run(router)

    assert router.requests[0].max_batch_bytes == MAX_BATCH_BYTES
    assert [e.WhichOneof("event") for e in events] == [
        "started",
        "model_select",
        "text_delta",
        "text_delta",
        "usage",
    ]
    assert [e.text_delta.text for e in events if e.HasField("text_delta")] == ["Hel", "lo"]
    assert outcome.completed.message.content == "Hello"
    assert outcome.completed.usage.output_tokens == 2
