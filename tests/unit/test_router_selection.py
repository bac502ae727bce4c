"""Model selection without a network: the task classifier, task-class models,
overrides, and auth-profile rotation (LRU, pinning)."""

from __future__ import annotations

import itertools

import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.config import ClassifierConfig, Config, ConfigError, ProviderConfig, load_config
from runyard.common.errors import FailedPrecondition
from runyard.router.cooldowns import CooldownStore
from runyard.router.engine import Router
from runyard.router.profiles import AuthProfiles
from runyard.router.request_classes import RequestClassifier, looks_like_code

RULES = [
    {"task_class": "code", "has_code": True},
    {"task_class": "vision", "has_attachments": True},
    {"task_class": "translate", "keywords": ["translate", "auf deutsch"]},
    {"task_class": "ticket", "regex": r"\bJIRA-\d+\b"},
    {"task_class": "long", "min_chars": 200},
    {"task_class": "chat", "max_chars": 20, "has_code": False},
]


def classifier(default: str = "") -> RequestClassifier:
    return RequestClassifier(ClassifierConfig.model_validate({"rules": RULES, "default_class": default}))


@pytest.mark.parametrize(
    ("text", "attachments", "expected"),
    [
        ("fix this:\n```python\nprint(1)\n```", 0, ("code", "rule 1")),
        ("def f(x):\n    return x\nimport os", 0, ("code", "rule 1")),
        ("what is in this picture?", 1, ("vision", "rule 2")),
        ("Please TRANSLATE this", 0, ("translate", "rule 3")),
        ("Sag es mir auf Deutsch bitte", 0, ("translate", "rule 3")),
        ("untranslated words do not count as the keyword", 0, ("", "")),
        ("Look at JIRA-1234 again", 0, ("ticket", "rule 4")),
        ("x" * 200, 0, ("long", "rule 5")),
        ("hello there", 0, ("chat", "rule 6")),
        ("a sentence that is neither short nor special", 0, ("", "")),
    ],
)
def test_classifier_rules(text, attachments, expected):
    match = classifier().classify_text(text, attachments)
    assert (match.task_class, match.rule) == expected


def test_default_class_and_first_match_wins():
    assert (
        classifier("general").classify_text("a sentence that is neither short nor special").task_class
        == "general"
    )
    # Code inside a long text: rule 1 comes first.
    assert classifier().classify_text("x" * 300 + "\n```\ncode\n```").task_class == "code"


def test_code_heuristic():
    assert looks_like_code("```\nanything\n```")
    assert looks_like_code("int main() {\n  return 0;\n}")
    assert not looks_like_code("I think; therefore I am.")
    assert not looks_like_code("Dear team, see you tomorrow.")


def test_classifier_reads_the_run_input_and_its_attachments():
    run = common_pb2.RunPayload(
        input=common_pb2.RunInput(text="describe", attachments=[common_pb2.Attachment(name="a.png")])
    )
    assert classifier().classify(run, []).task_class == "vision"
    history = [common_pb2.Message(role=common_pb2.ROLE_USER, content="please translate")]
    assert classifier().classify(common_pb2.RunPayload(), history).task_class == "translate"


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ({"task_class": "x"}, "sets no condition"),
        ({"task_class": "x", "regex": "("}, "invalid regular expression"),
        ({"task_class": "bad class", "min_chars": 1}, "task class names"),
        ({"task_class": "x", "min_chars": 10, "max_chars": 5}, "exceeds max_chars"),
    ],
)
def test_classifier_config_is_validated(rule, problem):
    with pytest.raises(ConfigError) as error:
        load_config(environ={"RUNYARD_CLASSIFIER__RULES": __import__("json").dumps([rule])})
    assert error.value.problems[0][0].startswith("classifier.rules.0")
    assert problem in str(error.value)


def test_agent_model_refs_are_checked_against_providers():
    with pytest.raises(ConfigError) as error:
        load_config(
            environ={
                "RUNYARD_AGENTS__DEFAULT__MODEL": "echo/a",
                "RUNYARD_AGENTS__DEFAULT__TASK_MODELS": '{"code": "nowhere/x"}',
                "RUNYARD_AGENTS__DEFAULT__CONTEXT_WINDOW_CHAIN": '["gone/big"]',
            }
        )
    paths = {path for path, _ in error.value.problems}
    assert paths == {"agents.default.task_models.code", "agents.default.context_window_chain"}


def test_keys_are_never_accepted_in_the_config_and_never_echoed():
    with pytest.raises(ConfigError) as error:
        load_config(
            environ={
                "RUNYARD_PROVIDERS__X__TYPE": "openai",
                "RUNYARD_PROVIDERS__X__BASE_URL": "http://x",
                "RUNYARD_PROVIDERS__X__AUTH_PROFILES": '{"main": "sk-live-0123456789abcdef"}',
            }
        )
    assert "environment variable" in str(error.value)
    assert "sk-live" not in str(error.value)


def router(data: dict) -> Router:
    config = Config.model_validate({"providers": {"echo": {"type": "echo"}}, **data})
    return Router(config, CooldownStore(config.router))


def test_selection_by_task_class_override_and_exclusion():
    r = router(
        {
            "agents": {
                "default": {
                    "model": "echo/small",
                    "fallbacks": ["echo/mid"],
                    "task_models": {"code": "echo/coder"},
                }
            },
            "classifier": {"rules": [{"task_class": "code", "has_code": True}]},
        }
    )
    plain = r.select(common_pb2.RunPayload(input=common_pb2.RunInput(text="hi")))
    assert ([c.ref for c in plain.candidates], plain.task_class, plain.rule) == (
        ["echo/small", "echo/mid"],
        "",
        "agent_primary",
    )
    coded = r.select(common_pb2.RunPayload(input=common_pb2.RunInput(text="```\nx = 1\n```")))
    assert ([c.ref for c in coded.candidates], coded.task_class, coded.rule) == (
        ["echo/coder", "echo/small", "echo/mid"],
        "code",
        "task_class",
    )
    chosen = r.select(common_pb2.RunPayload(model=common_pb2.ModelPreferences(task_class="code")))
    assert chosen.candidates[0].ref == "echo/coder"
    override = r.select(
        common_pb2.RunPayload(
            model=common_pb2.ModelPreferences(model="echo/mid", exclude_models=["echo/small"])
        )
    )
    assert ([c.ref for c in override.candidates], override.rule) == (["echo/mid"], "request_override")
    with pytest.raises(FailedPrecondition) as error:
        r.select(common_pb2.RunPayload(model=common_pb2.ModelPreferences(model="nowhere/x")))
    assert (error.value.reason, error.value.field) == ("MODEL_NOT_CONFIGURED", "model.model")


def test_profiles_rotate_least_recently_used_and_pin_per_session():
    ticks = itertools.count()
    profiles = AuthProfiles(
        {
            "p": ProviderConfig(
                type="openai", base_url="http://x", auth_profiles={"a": "KA", "b": "KB", "c": "KC"}
            )
        },
        clock=lambda: float(next(ticks)),
    )

    def every(name: str) -> bool:
        return True

    # New sessions spread over the least recently used profiles.
    order = []
    for session in ("s1", "s2", "s3", "s4"):
        chosen = profiles.ordered("p", session, every)[0]
        profiles.use(chosen, session)
        order.append(chosen.name)
    assert order == ["a", "b", "c", "a"]
    # A session stays on its pinned profile while it works ...
    assert profiles.ordered("p", "s2", every)[0].name == "b"
    # ... and without its pin it gets plain least-recently-used order.
    profiles.unpin(profiles.get("p", "b"), "s2")
    assert profiles.pinned("p", "s2") is None
    assert [p.name for p in profiles.ordered("p", "s2", every)] == ["b", "c", "a"]
    # Cooling profiles (here the one that just failed) are not offered.
    assert [p.name for p in profiles.ordered("p", "s2", lambda name: name != "b")] == ["c", "a"]


def test_single_key_provider_has_one_default_profile(monkeypatch):
    monkeypatch.setenv("ONLY_KEY", "k-1")
    profiles = AuthProfiles({"p": ProviderConfig(type="openai", base_url="http://x", api_key_env="ONLY_KEY")})
    [profile] = profiles.ordered("p", "", lambda name: True)
    assert (profile.name, profile.api_key()) == ("default", "k-1")
    assert profiles.missing_keys() == []
    monkeypatch.delenv("ONLY_KEY")
    assert profiles.missing_keys() == [("p", "default", "ONLY_KEY")]
