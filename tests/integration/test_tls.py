"""Mutual TLS between the services, server TLS for clients (issue 5)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest
import trustme

from runyard import Client, load_config
from runyard.common import tls
from runyard.common.errors import from_rpc_error
from runyard.v1 import GatewayServiceStub, ResolveSessionRequest, SendMessageRequest, SessionServiceStub
from tests.stack import flatten_env

pytestmark = pytest.mark.timeout(90)


async def test_services_talk_over_mutual_tls_and_refuse_plaintext_or_certless_peers(
    stack_factory, tmp_path: Path
):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    ca_pem, cert_pem, key_pem = (paths[n].read_bytes() for n in ("ca", "cert", "key"))

    tls_config = {
        "tls": {
            "enabled": True,
            "ca_file": str(paths["ca"]),
            "cert_file": str(paths["cert"]),
            "key_file": str(paths["key"]),
        }
    }
    stack = stack_factory(tls_config)
    mutual = grpc.ssl_channel_credentials(ca_pem, private_key=key_pem, certificate_chain=cert_pem)
    server_only = grpc.ssl_channel_credentials(ca_pem)
    stack.channel_credentials = mutual
    await stack.start()

    # A client that trusts the CA (no client certificate) chats through the gateway.
    async with grpc.aio.secure_channel(stack.gateway_address, server_only) as channel:
        events = [
            e
            async for e in GatewayServiceStub(channel).SendMessage(
                SendMessageRequest(session_key="tls", text="over TLS")
            )
        ]
    assert events[-1].completed.message.content == "echo: over TLS"

    # Plaintext is refused.
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            _ = [
                e
                async for e in GatewayServiceStub(channel).SendMessage(
                    SendMessageRequest(session_key="tls", text="hi"), timeout=5
                )
            ]
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

    sessions_address = f"127.0.0.1:{stack.ports['sessions']}"
    request = ResolveSessionRequest(org_id="o", session_key="k", agent_id="default")
    # Internal services demand a client certificate signed by the CA.
    async with grpc.aio.secure_channel(sessions_address, server_only) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as certless:
            await SessionServiceStub(channel).ResolveSession(request, timeout=5)
    assert certless.value.code() == grpc.StatusCode.UNAVAILABLE
    other_ca = trustme.CA()
    stranger = other_ca.issue_cert("127.0.0.1")
    foreign = grpc.ssl_channel_credentials(
        ca_pem,
        private_key=stranger.private_key_pem.bytes(),
        certificate_chain=b"".join(b.bytes() for b in stranger.cert_chain_pems),
    )
    async with grpc.aio.secure_channel(sessions_address, foreign) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as untrusted:
            await SessionServiceStub(channel).ResolveSession(request, timeout=5)
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    # With a good certificate the TLS handshake passes; the call still needs the service credential.
    async with grpc.aio.secure_channel(sessions_address, mutual) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as no_secret:
            await SessionServiceStub(channel).ResolveSession(request, timeout=5)
    assert from_rpc_error(no_secret.value).reason == "INTERNAL_AUTH_REQUIRED"

    # The public client and `runyard send` take the same [tls] settings.
    settings = tls.load(load_config(environ=flatten_env(tls_config)))
    async with Client(stack.gateway_address, tls=settings) as client:
        events = [e async for e in client.send("tls-client", "from the client")]
    assert events[-1].completed.message.content == "echo: from the client"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")} | flatten_env(tls_config)
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        "send",
        "--gateway",
        stack.gateway_address,
        "--session",
        "tls-cli",
        "from the CLI",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await cli.communicate()
    assert cli.returncode == 0, err.decode()
    assert "echo: from the CLI" in out.decode()
