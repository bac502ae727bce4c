"""Configuration: defaults, environment overrides, errors with paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from runyard import ConfigError, load_config


def test_defaults_are_valid_and_run_on_echo():
    config = load_config(environ={})
    assert config.agent("").chain == ["echo/echo"]
    assert config.providers["echo"].type == "echo"
    assert config.gateway.handshake_timeout_ms == 15_000


def test_environment_overrides_nested_fields_and_lists(tmp_path: Path):
    config = load_config(
        environ={
            "RUNYARD_GATEWAY__LISTEN": "0.0.0.0:6000",
            "RUNYARD_DATABASE_URL": "postgresql://db/x",
            "RUNYARD_PROVIDERS__OPENAI__TYPE": "openai",
            "RUNYARD_PROVIDERS__OPENAI__BASE_URL": "http://127.0.0.1:9/v1",
            "RUNYARD_AGENTS__DEFAULT__MODEL": "openai/m",
            "RUNYARD_AGENTS__DEFAULT__FALLBACKS": '["echo/echo"]',
        }
    )
    assert config.gateway.listen == "0.0.0.0:6000"
    assert config.database.url == "postgresql://db/x"
    assert config.agent("default").chain == ["openai/m", "echo/echo"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("15000", 15_000), ("500", 1_000), ("999999", 120_000), (" 2500 ", 2_500)],
)
def test_handshake_timeout_env_is_clamped(raw: str, expected: int):
    config = load_config(environ={"RUNYARD_HANDSHAKE_TIMEOUT_MS": raw})
    assert config.gateway.handshake_timeout_ms == expected


@pytest.mark.parametrize("raw", ["soon", "1.5s", "0", "-10", ""])
def test_handshake_timeout_rejects_non_numeric_and_non_positive(raw: str):
    with pytest.raises(ConfigError) as error:
        load_config(environ={"RUNYARD_HANDSHAKE_TIMEOUT_MS": raw})
    [(path, message)] = error.value.problems
    assert path == "gateway.handshake_timeout_ms"
    assert "RUNYARD_HANDSHAKE_TIMEOUT_MS" in message


def test_every_bad_field_is_reported_with_its_path(tmp_path: Path):
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[gateway]
listen = "nowhere"
max_attempts = 0
typo_field = 1

[providers.openai]
type = "openai"

[agents.default]
model = "not-a-ref"
"""
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    paths = {p for p, _ in error.value.problems}
    assert paths == {
        "gateway.listen",
        "gateway.max_attempts",
        "gateway.typo_field",
        "providers.openai",
        "agents.default.model",
    }
    assert "unknown setting" in dict(error.value.problems)["gateway.typo_field"]
    assert "base_url is required" in dict(error.value.problems)["providers.openai"]


def test_agents_must_name_configured_providers(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[agents.default]\nmodel = "ghost/m"\nfallbacks = ["echo/echo", "nope/x"]\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    problems = dict(error.value.problems)
    assert "provider 'ghost'" in problems["agents.default.model"]
    assert "provider 'nope'" in problems["agents.default.fallbacks"]


def test_unreadable_or_invalid_toml_names_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(broken, environ={})


def test_example_config_is_valid():
    config = load_config(Path(__file__).parents[2] / "runyard.example.toml", environ={})
    assert "assistant" in config.agents


def test_credentials_in_provider_headers_are_refused_without_echoing_them(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[providers.p]\ntype = "openai"\nbase_url = "http://x/v1"\n'
        '[providers.p.headers]\nAuthorization = "Bearer sk-secret-value"\n'
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert "providers.p.headers" in dict(error.value.problems)
    assert "sk-secret-value" not in str(error.value)


def test_embedded_database_lives_under_runyard_home_unless_data_dir_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from runyard.cli.up import embedded_data_dir

    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    assert embedded_data_dir(load_config(environ={})) == tmp_path / "home" / "pgdata"
    chosen = load_config(environ={"RUNYARD_DATA_DIR": str(tmp_path / "elsewhere")})
    assert embedded_data_dir(chosen) == tmp_path / "elsewhere"
    monkeypatch.delenv("RUNYARD_HOME")
    assert embedded_data_dir(load_config(environ={})) == Path("~/.local/share/runyard/pgdata").expanduser()
