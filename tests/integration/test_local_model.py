"""A real model, offline: SmolLM2-135M-Instruct served by llama.cpp through
the whole stack (`runyard up --local-model`). Runs only when the
`local-model` extra is installed (marker `local_model`)."""

from __future__ import annotations

import pytest

from tests.integration.test_cli_up import _env, _run, _stop, _up
from tests.stack import free_port

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]


async def test_local_model_answers_through_all_four_services(tmp_path):
    env = _env(tmp_path)
    port = free_port()
    proc, banner = await _up(env, "--local-model", "--local-model-port", str(port))
    try:
        assert "default agent: local/smollm2" in banner
        code, out, err = await _run(
            env,
            "send",
            "--session",
            "smol",
            "--timing",
            "What is the capital of France? Answer in one sentence.",
        )
        assert code == 0, err
        assert out.strip(), "the model answered nothing"
        assert "local/smollm2" in err and "first token" in err
        code, out, err = await _run(env, "send", "--session", "smol", "And of Germany?")
        assert code == 0, err
        code, shown, _ = await _run(env, "sessions", "show", "smol")
        assert "What is the capital of France?" in shown and "And of Germany?" in shown
    finally:
        await _stop(proc)
    assert proc.returncode == 0
