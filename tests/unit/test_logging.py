"""Service logs: what ``setup_logging`` lets through at each level.

httpx logs every request at INFO (``HTTP Request: POST ... "HTTP/1.1 200
OK"``): a line per model call in the router's log, and about 2% of its CPU
under load (``runyard bench stack``, issue 10). Those lines show at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from runyard.common.config import load_config
from runyard.common.runtime import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


async def _one_request() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.post("http://provider.test/v1/chat/completions", json={})


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("WARNING", False), ("DEBUG", True)])
async def test_http_request_lines_show_only_at_debug(level: str, shown: bool, capsys) -> None:
    setup_logging("router", load_config(environ={"RUNYARD_LOG_LEVEL": level}))

    await _one_request()
    logging.getLogger("runyard.router.engine").warning("a failover")

    err = capsys.readouterr().err
    assert ("HTTP Request: POST http://provider.test/v1/chat/completions" in err) is shown
    assert "WARNING router runyard.router.engine: a failover" in err
