"""The router's failover engine: pick a model, stream, decide after each failure.

:meth:`Router.generate` yields ``GenerateResponse`` messages for one request:
``model_select`` first, then text deltas and tool calls, ``model_failover``
whenever the answer moves to another model, ``usage`` and ``final``.

How a request is served:

1. **Selection** (:meth:`Router.select`): the request's model override, else
   the model the agent maps to the request's task class (from the request or
   the :class:`~runyard.router.request_classes.RequestClassifier`), else the
   agent's primary; the agent's chain follows.
2. **Pick** (:meth:`Router._pick`): the first candidate with an auth profile
   that is not cooling down (the session's pinned profile, else the least
   recently used one). When every candidate is cooling, the one whose
   cooldown ends soonest is *probed* (each cooldown at most once per
   request, and never one this request already failed on; per model and key
   at most once per ``probe_interval_ms`` across requests; never a key
   disabled for billing or a revoked credential; a failed probe extends the
   cooldown without escalating it); if none may be probed the request fails
   at once with ``ALL_MODELS_COOLING``.
3. **Attempt**: open the stream and wait for the first token
   (``ttft_timeout_ms``), then for each next one (``idle_timeout_ms``); a
   stall is a TIMEOUT failure. Every attempt shares one deadline: the shorter
   of the caller's gRPC deadline and ``request_timeout_ms``.
4. **Decision** on a failure (:mod:`runyard.router.policy`): retry the same
   model with jittered exponential backoff (tenacity; honouring Retry-After;
   bounded by ``max_retries`` and the deadline), rotate the auth profile,
   move to the next model (or the agent's context-window / content-policy
   chain), or abort with FAILED_PRECONDITION naming the URL or field.
   Each failure updates the cooldowns (:mod:`runyard.router.cooldowns`:
   the model's on its key, or the key's; one request escalates a key once) and
   each decision is a ``model.failover`` lifecycle event and a metric.
   After tokens were streamed the answer restarts on the next model and the
   ``model_failover`` event says ``restart_output``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential, wait_random

from runyard._proto.v1 import common_pb2, router_pb2
from runyard.common import metrics
from runyard.common.config import AgentConfig, Config
from runyard.common.errors import DeadlineExceeded, FailedPrecondition, NotFound, RunyardError, Unavailable
from runyard.router.cooldowns import (
    DISABLED,
    OK,
    CooldownKey,
    CooldownState,
    CooldownStore,
    Failure,
    fill_cooldown,
)
from runyard.router.failures import Classification, FailoverReason, classify_failure
from runyard.router.policy import RETRIES, SWITCHES, Decision, policy_for
from runyard.router.profiles import AuthProfile, AuthProfiles
from runyard.router.providers import Chunk, Provider, ProviderError, Request, build_provider
from runyard.router.request_classes import RequestClassifier

__all__ = ["Candidate", "Router", "Selection", "StatusRow", "failover_reason_value"]

log = logging.getLogger(__name__)

#: Lifecycle event type of every router decision.
FAILOVER_EVENT = "model.failover"
_MAX_PROBE_MARKS = 10_000


def failover_reason_value(reason: str) -> common_pb2.FailoverReason:
    """The ``FailoverReason`` enum value for a reason name."""
    # Value() is typed as a plain int in protobuf's stubs.
    return cast(common_pb2.FailoverReason, common_pb2.FailoverReason.Value(f"FAILOVER_REASON_{reason}"))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model to try: ``ref`` is ``provider/model``."""

    ref: str
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class Selection:
    """The ordered candidates for a request, its task class and the rule
    that chose the first candidate (``agent_primary``, ``task_class``,
    ``request_override``)."""

    candidates: list[Candidate]
    task_class: str
    rule: str


@dataclass(frozen=True, slots=True)
class StatusRow:
    """The effective state of a provider / auth profile / model
    (``model == ""``: the profile as a whole). Times are epoch seconds."""

    provider: str
    profile: str
    model: str
    health: str
    until: float | None
    last_reason: str
    last_message: str
    failure_count: int
    last_failure_at: float | None


#: Failures that condemn the credential, not the model or the moment.
_KEY_REASONS = frozenset({FailoverReason.AUTH, FailoverReason.AUTH_PERMANENT, FailoverReason.BILLING})


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What kept one model from answering this request (for errors and skips)."""

    ref: str
    reason: str
    detail: str = ""
    #: End of its cooldown (epoch seconds), if one applies.
    until: float | None = None
    #: Its key is disabled (BILLING, AUTH_PERMANENT).
    disabled: bool = False
    #: Passed over because it is cooling down, never called.
    skipped: bool = False
    profile: str = ""

    def retryable(self) -> bool:
        """Whether waiting (and asking again) may help."""
        return not self.disabled and policy_for(self.reason).retryable

    def describe(self, now: float) -> str:
        """``provider/model: REASON (detail), cooling until <UTC> (in 12s)``."""
        text = f"{self.ref}: {'skipped, ' if self.skipped else ''}{self.reason}"
        if self.detail:
            text += f" ({self.detail})"
        if self.until is not None and self.until > now:
            what = "key disabled" if self.disabled else "cooling"
            text += f", {what} until {_utc(self.until)} (in {_duration(self.until - now)})"
        return text

    def skip(self) -> common_pb2.ModelSkip:
        """The wire form (``ModelSelect.skipped``, ``ModelFailover.skipped``)."""
        skip = common_pb2.ModelSkip(model=self.ref, disabled=self.disabled, auth_profile=self.profile)
        with contextlib.suppress(ValueError):  # a reason a newer replica wrote
            skip.reason = failover_reason_value(self.reason)
        if self.until is not None:
            skip.until.FromNanoseconds(int(self.until * 1e9))
        return skip


def _utc(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(slots=True)
class _Pick:
    candidate: Candidate
    profile: AuthProfile
    probe: bool = False
    #: Candidates earlier in the list passed over because they are cooling.
    skips: list[_Outcome] = field(default_factory=list)


@dataclass(slots=True)
class _State:
    """One request's progress."""

    run: common_pb2.RunPayload
    agent_id: str
    agent: AgentConfig
    deadline: float
    session: str
    request: Request
    excluded: set[str]
    #: Candidates not tried yet, in order (the chain, or a special chain).
    remaining: list[Candidate] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    #: Cooldown keys this request already probed or failed on: never probed
    #: (again) by it.
    probed_keys: set[CooldownKey] = field(default_factory=set)
    #: Cooldown keys whose failure count this request already raised: its
    #: further failures on them extend the cooldown without escalating it.
    escalated: set[CooldownKey] = field(default_factory=set)
    #: (provider, auth profile) pairs whose key failed (AUTH, AUTH_PERMANENT,
    #: BILLING) during this request: never probed again by it.
    failed_profiles: set[tuple[str, str]] = field(default_factory=set)
    last: _AttemptFailed | None = None
    #: Per model, in the order met: its last failure in this request, or why
    #: it was passed over.
    outcomes: dict[str, _AttemptFailed | _Outcome] = field(default_factory=dict)
    succeeded: bool = False
    #: GenerateRequest.purpose and after_compaction (CONTEXT_OVERFLOW handling).
    purpose: int = 0
    after_compaction: bool = False
    #: This request's budget in seconds, and the run's in ms (for messages).
    budget_s: float = 0.0
    run_budget_ms: int = 0
    #: Until when (monotonic) the current candidate may wait for its first
    #: token: half of what is left while another model could still answer,
    #: else the request's deadline.
    slot_end: float = 0.0

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()


class _AttemptFailed(Exception):
    """One failed attempt, classified (internal to the engine)."""

    def __init__(
        self,
        candidate: Candidate,
        profile: AuthProfile,
        error: ProviderError,
        verdict: Classification,
        started_at: float,
        *,
        streamed: bool,
        probe: bool,
    ):
        super().__init__(error.message)
        self.candidate = candidate
        self.profile = profile
        self.error = error
        self.verdict = verdict
        self.started_at = started_at
        self.failed_at = time.time()
        self.streamed = streamed
        self.probe = probe
        self.cooldown: CooldownState | None = None
        self.cooldown_key: CooldownKey | None = None
        self.cooled = False
        #: The request already escalated this failure's cooldown key.
        self.repeat = False


class _Watchdog:
    """The stall and deadline timer of one attempt, cheap per chunk.

    While armed (the engine awaits the provider), it cancels the task once no
    chunk arrived for the armed stall time or the request's deadline passed,
    and :meth:`take` then tells which. Arming only records the time: the one
    timer re-schedules itself when it wakes early, so a chunk costs no timer
    heap operation (``asyncio.timeout`` per chunk would cost two). Disarmed
    while the engine hands a chunk to its consumer: a slow client is not a
    stalled model.
    """

    __slots__ = ("cancelling", "deadline", "fired", "handle", "last", "loop", "stall_s", "task")

    def __init__(self, deadline: float):
        self.loop = asyncio.get_running_loop()
        self.deadline = deadline  # loop.time() == time.monotonic()
        self.stall_s = 0.0
        self.last = self.loop.time()
        self.task: asyncio.Task[Any] | None = None
        self.cancelling = 0
        self.fired = ""
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, stall_s: float) -> None:
        """Start timing a wait for the next chunk (at most ``stall_s``)."""
        self.stall_s = stall_s
        self.last = self.loop.time()
        self.task = asyncio.current_task()
        assert self.task is not None
        self.cancelling = self.task.cancelling()
        due = min(self.last + stall_s, self.deadline)
        handle = self.handle
        if handle is None or handle.when() > due:
            # Only when the timer would wake too late (first arm, shorter stall).
            if handle is not None:
                handle.cancel()
            self.handle = self.loop.call_at(due, self._check)

    def disarm(self) -> None:
        """The wait ended (chunk, end, error): stop timing it."""
        self.task = None

    def _check(self) -> None:
        now = self.loop.time()
        task = self.task
        if task is None:  # disarmed: nothing to time now; arm() pulls the timer in if needed
            self.handle = self.loop.call_at(now + self.stall_s, self._check)
            return
        due = min(self.last + self.stall_s, self.deadline)
        if now < due:  # a chunk came since the timer was set: wait for the rest
            self.handle = self.loop.call_at(due, self._check)
            return
        self.handle = None
        self.fired = "deadline" if now >= self.deadline else "stall"
        task.cancel()

    def take(self) -> str:
        """``"stall"`` or ``"deadline"`` if the watchdog cancelled the task (and
        no one else did: that cancellation is then consumed), else ``""``."""
        fired, self.fired = self.fired, ""
        task = self.task
        if fired and task is not None and task.uncancel() <= self.cancelling:
            return fired
        return ""

    def close(self) -> None:
        """Stop the timer for good."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.task = None


@dataclass(slots=True)
class _Opened:
    stream: AsyncIterator[Chunk] | None
    buffered: list[Chunk]
    watchdog: _Watchdog
    #: When the successful attempt started (epoch seconds).
    started_at: float
    #: The longest wait for each next token (seconds), and whether that is
    #: a share of the run's budget rather than ``idle_timeout_ms``.
    idle_s: float = 0.0
    idle_cut: bool = False


class _AllCooling(Exception):
    def __init__(self, candidates: list[Candidate]):
        super().__init__("every candidate is cooling down")
        self.candidates = list(candidates)


class Router:
    """Model choice and failover for every agent in ``config``.

    Args:
        config: the whole configuration (router section, providers, agents,
            classifier).
        store: shared cooldown state (see :class:`CooldownStore`).
        instance_id: this replica's id, the ``source`` of its lifecycle events.
        providers: adapters by provider name (default: built from config).
    """

    def __init__(
        self,
        config: Config,
        store: CooldownStore,
        *,
        instance_id: str = "router",
        providers: dict[str, Provider] | None = None,
    ):
        self.config = config
        cfg = config.router
        self.store = store
        self.instance_id = instance_id
        self.providers: dict[str, Provider] = providers or {
            name: build_provider(name, pc, connect_timeout_s=cfg.connect_timeout_ms / 1000)
            for name, pc in config.providers.items()
        }
        self.profiles = AuthProfiles(config.providers)
        self.classifier = RequestClassifier(config.classifier)
        self.ttft_timeout_s = cfg.ttft_timeout_ms / 1000
        self.idle_timeout_s = cfg.idle_timeout_ms / 1000
        self.request_timeout_s = cfg.request_timeout_ms / 1000
        self.max_retries = cfg.max_retries
        self.max_retry_after_s = cfg.max_retry_after_ms / 1000
        self.probe_interval_s = cfg.probe_interval_ms / 1000
        self.primary_probe_margin_s = cfg.primary_probe_margin_ms / 1000
        # initial * 2^(n-1) plus up to `initial` of jitter, at most the max.
        self._backoff_max_s = cfg.retry_backoff_max_ms / 1000
        self._backoff = wait_exponential(
            multiplier=cfg.retry_backoff_initial_ms / 1000, max=self._backoff_max_s
        ) + wait_random(0, cfg.retry_backoff_initial_ms / 1000)
        self._probes: dict[tuple[str, str, str], float] = {}
        self._token_counters: dict[str, Any] = {}
        #: provider -> models named anywhere in the agents' configuration.
        self.catalog: dict[str, list[str]] = {}
        for agent in config.agents.values():
            for ref in agent.model_refs:
                provider, model = ref.split("/", 1)
                models = self.catalog.setdefault(provider, [])
                if model not in models:
                    models.append(model)
        self._gauge_task: asyncio.Task[None] | None = None
        self._gauge_dirty = asyncio.Event()
        store.on_change = self._gauge_dirty.set

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load shared state and start the provider-state gauge updater."""
        for provider, profile, env in self.profiles.missing_keys():
            log.warning(
                "providers.%s auth profile %r: environment variable %s is not set; calls with it send no key",
                provider,
                profile,
                env,
            )
        await self.store.start()
        self.update_gauges()
        self._gauge_task = asyncio.create_task(self._gauges(), name="provider-state-gauges")

    async def aclose(self) -> None:
        """Stop background work, write pending state (bounded), close HTTP clients."""
        if self._gauge_task is not None:
            self._gauge_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauge_task
        await self.store.close()
        for provider in self.providers.values():
            await provider.aclose()

    async def _gauges(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._gauge_dirty.wait()
            self._gauge_dirty.clear()
            self.update_gauges()
            await asyncio.sleep(0.05)

    def update_gauges(self) -> None:
        """Set ``runyard_provider_state`` for every configured provider /
        profile / model (models outside the configuration are left out so
        request overrides cannot grow the label set)."""
        for row in self.status(include_unconfigured=False):
            metrics.set_provider_state(row.provider, row.profile, row.model, row.health)

    # ------------------------------------------------------------ selection

    def _agent(self, agent_id: str) -> AgentConfig:
        agent = self.config.agent(agent_id)
        if agent is None:
            raise NotFound(
                f"agent {agent_id!r} is not configured", reason="AGENT_NOT_FOUND", field="agent_id"
            )
        return agent

    def _candidate(self, ref: str, field_name: str) -> Candidate:
        provider, _, model = ref.partition("/")
        if not model or provider not in self.providers:
            raise FailedPrecondition(
                f"model {ref!r} names no configured provider", reason="MODEL_NOT_CONFIGURED", field=field_name
            )
        return Candidate(ref, provider, model)

    def select(self, run: common_pb2.RunPayload, messages: Sequence[common_pb2.Message] = ()) -> Selection:
        """The ordered candidates for ``run`` (see the module docstring).

        Raises:
            NotFound: unknown agent (AGENT_NOT_FOUND, field agent_id).
            FailedPrecondition: the override names no configured provider
                (MODEL_NOT_CONFIGURED, field model.model), or every model is
                excluded (NO_CANDIDATE_MODELS).
        """
        agent = self._agent(run.agent_id)
        task_class = run.model.task_class or self.classifier.classify(run, messages).task_class
        chain = agent.chain
        rule = "agent_primary"
        if run.model.model:
            first = self._candidate(run.model.model, "model.model").ref
            chain = [first, *[m for m in chain if m != first]]
            rule = "request_override"
        elif task_class and task_class in agent.task_models:
            first = agent.task_models[task_class]
            chain = [first, *[m for m in chain if m != first]]
            rule = "task_class"
        excluded = set(run.model.exclude_models)
        refs = [ref for ref in chain if ref not in excluded]
        if not refs:
            raise FailedPrecondition(
                "every model of the agent's chain is excluded for this run", reason="NO_CANDIDATE_MODELS"
            )
        return Selection([self._candidate(ref, "model.model") for ref in refs], task_class, rule)

    def _usable(self, candidate: Candidate, now: float) -> Callable[[str], bool]:
        store = self.store

        def usable(profile: str) -> bool:
            return store.blocking(candidate.provider, profile, candidate.model, now) is None

        return usable

    def _probe_allowed(self, key: tuple[str, str, str], now: float) -> bool:
        last = self._probes.get(key)
        return last is None or now - last >= self.probe_interval_s

    def _mark_probe(self, key: tuple[str, str, str], now: float) -> None:
        if len(self._probes) >= _MAX_PROBE_MARKS:
            self._probes.clear()
        self._probes[key] = now

    def _pick(self, remaining: list[Candidate], state: _State, *, first: bool = False) -> _Pick | None:
        """Take the next candidate (and profile) off ``remaining``.

        Returns None when ``remaining`` is empty.

        Raises:
            _AllCooling: every remaining candidate is cooling and none may be
                probed now.
        """
        now = time.time()
        mono = time.monotonic()
        for index, candidate in enumerate(remaining):
            profiles = self.profiles.ordered(candidate.provider, state.session, self._usable(candidate, now))
            if profiles:
                skips = self._skips(remaining[:index], state, now) if index else []
                del remaining[index]
                state.tried.add(candidate.ref)
                return _Pick(candidate, profiles[0], skips=skips)
            if first and index == 0 and self.primary_probe_margin_s > 0:
                early = self._probe_target([candidate], state, now, mono, within=self.primary_probe_margin_s)
                if early is not None:
                    return self._take_probe(remaining, state, early, mono)
        target = self._probe_target(remaining, state, now, mono)
        if target is not None:
            return self._take_probe(remaining, state, target, mono)
        if not remaining:
            return None
        raise _AllCooling(remaining)

    def _cooling(self, candidate: Candidate, now: float) -> _Outcome | None:
        """Why ``candidate`` is cooling on every profile (the block that ends
        soonest), or None if a profile is usable."""
        best: tuple[str, CooldownState] | None = None
        for name in self.profiles.names(candidate.provider):
            blocking = self.store.blocking(candidate.provider, name, candidate.model, now)
            if blocking is None:
                return None
            if best is None or (blocking.until or now) < (best[1].until or now):
                best = (name, blocking)
        if best is None:
            return None
        name, blocking = best
        return _Outcome(
            candidate.ref,
            blocking.last_reason or FailoverReason.UNKNOWN,
            blocking.last_message,
            blocking.until,
            blocking.health_at(now) == DISABLED,
            skipped=True,
            profile=name if blocking.key.profile else "",
        )

    def _skips(self, candidates: Sequence[Candidate], state: _State, now: float) -> list[_Outcome]:
        """The cooling ``candidates`` passed over, recorded in ``state``."""
        skips = []
        for candidate in candidates:
            outcome = self._cooling(candidate, now)
            if outcome is not None:
                skips.append(outcome)
                state.outcomes.setdefault(candidate.ref, outcome)
        return skips

    def _probe_target(
        self,
        candidates: list[Candidate],
        state: _State,
        now: float,
        mono: float,
        *,
        within: float | None = None,
    ) -> tuple[float, Candidate, str, CooldownKey | None] | None:
        best: tuple[float, Candidate, str, CooldownKey | None] | None = None
        for candidate in candidates:
            for name in self.profiles.names(candidate.provider):
                if (candidate.provider, name) in state.failed_profiles:
                    continue  # it just failed in this very request
                blocking = self.store.blocking(candidate.provider, name, candidate.model, now)
                if blocking is not None and blocking.health_at(now) == DISABLED:
                    continue  # billing / revoked key: disabled for hours, not worth a probe
                if blocking is not None and blocking.key in state.probed_keys:
                    continue  # this request already probed that very cooldown
                until = blocking.until if blocking is not None and blocking.until is not None else now
                if within is not None and until - now > within:
                    continue
                if not self._probe_allowed((candidate.provider, name, candidate.model), mono):
                    continue
                if best is None or until < best[0]:
                    best = (until, candidate, name, blocking.key if blocking is not None else None)
        return best

    def _take_probe(
        self,
        remaining: list[Candidate],
        state: _State,
        target: tuple[float, Candidate, str, CooldownKey | None],
        mono: float,
    ) -> _Pick:
        _, candidate, name, key = target
        self._mark_probe((candidate.provider, name, candidate.model), mono)
        if key is not None:
            state.probed_keys.add(key)
        index = remaining.index(candidate)
        skips = self._skips(remaining[:index], state, time.time()) if index else []
        del remaining[index]
        state.tried.add(candidate.ref)
        return _Pick(candidate, self.profiles.get(candidate.provider, name), probe=True, skips=skips)

    def _chain(self, refs: Sequence[str], state: _State) -> list[Candidate]:
        return [
            self._candidate(ref, "model.model")
            for ref in refs
            if ref not in state.tried
            and ref not in state.excluded
            and ref.partition("/")[0] in self.providers
        ]

    # ------------------------------------------------------------ generate

    async def generate(
        self,
        run: common_pb2.RunPayload,
        messages: Sequence[common_pb2.Message],
        tools: Sequence[common_pb2.ToolDefinition] = (),
        *,
        timeout_s: float | None = None,
        purpose: int = router_pb2.GENERATE_PURPOSE_UNSPECIFIED,
        after_compaction: bool = False,
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        """Stream one answer for ``run``, failing over as the policy says.

        Args:
            run: the run payload (agent, model preferences, options, ids).
            messages: the whole prompt.
            tools: tools offered to the model.
            timeout_s: the caller's remaining deadline, if any. The shorter
                of it and the run's budget (``RunOptions.timeout_ms``, else
                the agent's ``timeout_ms``, else ``router.request_timeout_ms``)
                bounds every attempt, retry and fallback together; while
                another model could still answer, a model may wait for its
                first token at most half of what is left (and its retries
                must fit in that half), so a stalled model cannot starve the
                chain.
            purpose: ``GenerateRequest.purpose``. For a run's answer
                (GENERATE_PURPOSE_RUN) a CONTEXT_OVERFLOW with no larger model
                left asks the worker to compact the session (decision
                ``compact_session``) when compaction is enabled.
            after_compaction: the worker already compacted the session for
                this run: another overflow aborts.

        Raises:
            NotFound: unknown agent.
            FailedPrecondition: an error no other model can fix: reason
                ENDPOINT_NOT_FOUND (message names the URL), FORMAT (names the
                URL and the field the provider blamed), CONTEXT_OVERFLOW or
                CONTENT_POLICY with no chain left.
            Unavailable: every model failed (ALL_MODELS_FAILED) or every
                candidate is cooling down (ALL_MODELS_COOLING), and waiting
                may help (RetryInfo: when the first cooldown ends). The
                message lists each model with its reason and until when.
            FailedPrecondition: the same, but no model can recover by
                waiting (AUTH, BILLING, MODEL_NOT_FOUND, disabled keys):
                ``retryable`` is false.
            DeadlineExceeded: the shared deadline passed (ROUTER_DEADLINE).
        """
        agent = self._agent(run.agent_id)
        run_budget_ms = self.config.run_timeout_ms(run.agent_id, run.options.timeout_ms)
        budget = run_budget_ms / 1000 if timeout_s is None else max(min(timeout_s, run_budget_ms / 1000), 0.0)
        selection = self.select(run, messages)
        temperature = run.options.temperature if run.options.HasField("temperature") else agent.temperature
        state = _State(
            run=run,
            agent_id=run.agent_id or self.config.gateway.default_agent,
            agent=agent,
            deadline=time.monotonic() + budget,
            session=run.session_id or run.session_key,
            request=Request(
                model="",
                messages=messages,
                tools=tools,
                temperature=temperature,
                max_output_tokens=run.options.max_output_tokens or agent.max_output_tokens,
            ),
            excluded=set(run.model.exclude_models),
            budget_s=budget,
            run_budget_ms=run_budget_ms,
            purpose=purpose,
            after_compaction=after_compaction,
        )
        remaining = state.remaining = list(selection.candidates)
        try:
            pick = self._pick(remaining, state, first=True)
        except _AllCooling as cooling:
            error = self._cooling_error(state, cooling)
            metrics.ROUTER_ABORTS_TOTAL.labels(error.metadata.get("failover_reason", ""), "all_cooling").inc()
            raise error from None
        assert pick is not None
        rule = selection.rule
        if pick.probe:
            rule = "cooldown_probe"
        elif pick.skips:
            rule = "cooldown_skip"
        yield router_pb2.GenerateResponse(
            model_select=common_pb2.ModelSelect(
                model=pick.candidate.ref,
                task_class=selection.task_class,
                rule=rule,
                skipped=[skip.skip() for skip in pick.skips],
            )
        )
        while True:
            # aclosing: a client that goes away closes the provider call now,
            # not whenever the generator is garbage collected.
            try:
                async with contextlib.aclosing(self._serve(pick, state)) as served:
                    async for response in served:
                        yield response
            except DeadlineExceeded:
                metrics.ROUTER_ABORTS_TOTAL.labels(FailoverReason.TIMEOUT, Decision.DEADLINE).inc()
                raise
            if state.succeeded:
                return
            failure = state.last
            assert failure is not None
            nxt, decision = self._next(failure, remaining, state)
            yield router_pb2.GenerateResponse(
                model_failover=common_pb2.ModelFailover(
                    from_model=failure.candidate.ref,
                    to_model=nxt.candidate.ref,
                    reason=failover_reason_value(failure.verdict.reason),
                    restart_output=failure.streamed,
                    message=failure.verdict.detail or failure.error.message,
                    skipped=[skip.skip() for skip in nxt.skips],
                )
            )
            log.info(
                "%s -> %s (%s, %s)%s",
                failure.candidate.ref,
                nxt.candidate.ref,
                failure.verdict.reason,
                decision,
                " restarting the answer" if failure.streamed else "",
            )
            pick = nxt

    def _next(self, failure: _AttemptFailed, remaining: list[Candidate], state: _State) -> tuple[_Pick, str]:
        """Decide after a candidate failed for good; returns the next pick.

        ``remaining`` is replaced by the context-window or content-policy
        chain when the reason says so.

        Raises:
            RunyardError: abort, exhausted or all cooling (the decision is
                recorded first).
        """
        policy = policy_for(failure.verdict.reason)
        decision = Decision.NEXT_MODEL
        chain_name = ""
        if policy.next_model == "abort":
            self._decide(failure, state, Decision.ABORT)
            raise self._abort_error(failure, state)
        if policy.next_model in ("context_window_chain", "content_policy_chain"):
            chain_name = policy.next_model
            refs = (
                state.agent.context_window_chain
                if chain_name == "context_window_chain"
                else state.agent.content_policy_chain
            )
            remaining[:] = self._chain(refs, state)
            if not remaining:
                if chain_name == "context_window_chain" and self._compaction_available(state):
                    self._decide(failure, state, Decision.COMPACT_SESSION)
                else:
                    self._decide(failure, state, Decision.ABORT)
                raise self._abort_error(failure, state)
            decision = Decision(chain_name)
        self._cool(failure, state)
        try:
            nxt = self._pick(remaining, state)
        except _AllCooling as cooling:
            self._decide(failure, state, Decision.EXHAUSTED)
            raise self._cooling_error(state, cooling) from None
        if nxt is None:
            self._decide(failure, state, Decision.EXHAUSTED)
            raise self._exhausted_error(state)
        self._decide(failure, state, decision, to_model=nxt.candidate.ref, to_profile=nxt.profile.name)
        return nxt, decision

    def _compaction_available(self, state: _State) -> bool:
        """Whether the worker may compact the session and ask again after a
        CONTEXT_OVERFLOW: a run's answer, compaction enabled, not done yet."""
        return (
            state.purpose == router_pb2.GENERATE_PURPOSE_RUN
            and self.config.compaction.enabled
            and not state.after_compaction
        )

    async def _serve(self, pick: _Pick, state: _State) -> AsyncGenerator[router_pb2.GenerateResponse, None]:
        """Serve ``pick``'s candidate, rotating auth profiles as the policy
        allows; sets ``state.succeeded``, else ``state.last``."""
        candidate, profile = pick.candidate, pick.profile
        rotated: set[str] = set()
        rotations = 0
        now = time.monotonic()
        state.slot_end = now + (state.deadline - now) / 2 if self._others_left(state) else state.deadline
        while True:
            rotated.add(profile.name)
            try:
                async with contextlib.aclosing(
                    self._stream(candidate, profile, state, probe=pick.probe)
                ) as answer:
                    async for response in answer:
                        yield response
            except _AttemptFailed as failure:
                state.last = failure
                state.outcomes.pop(candidate.ref, None)  # keep the order of events
                state.outcomes[candidate.ref] = failure
                if failure.verdict.reason in _KEY_REASONS:
                    # The key itself is bad: no other model may be probed with it in this request.
                    state.failed_profiles.add((candidate.provider, profile.name))
                if pick.probe:
                    metrics.ROUTER_PROBES_TOTAL.labels("failure").inc()
                self.profiles.unpin(profile, state.session)
                policy = policy_for(failure.verdict.reason)
                if failure.streamed or pick.probe or policy.rotate == "no":
                    return
                if policy.rotate == "once" and rotations >= 1:
                    return
                self._cool(failure, state)
                now = time.time()
                usable = self._usable(candidate, now)
                options = [
                    p
                    for p in self.profiles.ordered(candidate.provider, state.session, usable)
                    if p.name not in rotated
                ]
                if not options:
                    return
                rotations += 1
                self._decide(
                    failure,
                    state,
                    Decision.ROTATE_AUTH_PROFILE,
                    to_model=candidate.ref,
                    to_profile=options[0].name,
                )
                profile = options[0]
                continue
            if pick.probe:
                metrics.ROUTER_PROBES_TOTAL.labels("success").inc()
            state.succeeded = True
            return

    def _others_left(self, state: _State) -> bool:
        """Whether another candidate could still be tried after the current
        one: one with a usable profile, or one that may be probed."""
        if not state.remaining:
            return False
        now = time.time()
        for candidate in state.remaining:
            for name in self.profiles.names(candidate.provider):
                if self.store.blocking(candidate.provider, name, candidate.model, now) is None:
                    return True
        return self._probe_target(state.remaining, state, now, time.monotonic()) is not None

    def _retry_same(self, exc: BaseException, state: _State) -> bool:
        if not isinstance(exc, _AttemptFailed) or exc.probe:
            return False
        policy = policy_for(exc.verdict.reason)
        if policy.retry_same == "backoff":
            return True
        if policy.retry_same == "backoff_if_last":
            return not self._others_left(state)
        if policy.retry_same == "retry_after":
            after = exc.verdict.retry_after_s
            return after is not None and after <= self.max_retry_after_s
        return False

    def _retry_wait(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        backoff = min(float(self._backoff(retry_state)), self._backoff_max_s)
        if isinstance(exc, _AttemptFailed):
            after = exc.verdict.retry_after_s
            if policy_for(exc.verdict.reason).retry_same == "retry_after":
                return after or 0.0
            if after is not None:
                return max(backoff, after)
        return backoff

    async def _stream(
        self, candidate: Candidate, profile: AuthProfile, state: _State, *, probe: bool
    ) -> AsyncGenerator[router_pb2.GenerateResponse, None]:
        """One candidate on one profile: open (with same-model retries), stream
        the answer, and on success yield ``usage`` and ``final``.

        Raises:
            _AttemptFailed: the attempt failed (classified, not yet recorded).
            DeadlineExceeded: the request's deadline passed.
        """
        try:
            opened = await self._open(candidate, profile, state, probe=probe)
        except _AttemptFailed as failure:
            if not self._retry_same(failure, state):
                raise
            opened = await self._retry(candidate, profile, state, failure, probe=probe)
        text: list[str] = []
        calls: list[common_pb2.ToolCall] = []
        usage = common_pb2.Usage()
        finish = "stop"
        streamed = False
        stream, watchdog = opened.stream, opened.watchdog
        tokens = self._tokens_streamed(candidate.provider)
        chunk: Chunk | None
        try:
            pending = opened.buffered
            while True:
                if pending:
                    chunk = pending.pop(0)
                elif stream is None:
                    break
                else:
                    chunk = await self._read(
                        stream, watchdog, candidate, state, opened.idle_s, first=False, cut=opened.idle_cut
                    )
                    if chunk is None:
                        break
                if chunk.kind == "text":
                    text.append(chunk.text)
                    streamed = True
                    tokens.inc()
                    yield router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text=chunk.text))
                elif chunk.kind == "tool_call" and chunk.tool_call is not None:
                    calls.append(chunk.tool_call)
                    streamed = True
                    yield router_pb2.GenerateResponse(tool_call=chunk.tool_call)
                elif chunk.kind == "usage":
                    usage = common_pb2.Usage(
                        input_tokens=chunk.input_tokens, output_tokens=chunk.output_tokens
                    )
                elif chunk.kind == "finish":
                    finish = chunk.finish_reason
        except ProviderError as exc:
            raise self._failed(
                candidate, profile, exc, opened.started_at, streamed=streamed, probe=probe
            ) from None
        finally:
            watchdog.close()
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]
        self.store.record_success(candidate.provider, profile.name, candidate.model, opened.started_at)
        if usage.ByteSize():
            yield router_pb2.GenerateResponse(usage=usage)
        final = common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            content="".join(text),
            tool_calls=calls,
            run_id=state.run.run_id,
            model=candidate.ref,
        )
        final.create_time.FromNanoseconds(time.time_ns())
        yield router_pb2.GenerateResponse(
            final=router_pb2.GenerateFinal(
                message=final, model=candidate.ref, usage=usage, finish_reason=finish
            )
        )

    async def _retry(
        self,
        candidate: Candidate,
        profile: AuthProfile,
        state: _State,
        failure: _AttemptFailed,
        *,
        probe: bool,
    ) -> _Opened:
        """Same-model retries after ``failure`` (tenacity: jittered exponential
        backoff, Retry-After honoured, at most ``max_retries`` more attempts,
        never sleeping past the candidate's share of the budget). The success
        path never gets here, so it pays nothing for retry bookkeeping.

        Raises:
            _AttemptFailed: the last failure, once no retry is left or allowed.
        """

        def stop(retry_state: RetryCallState) -> bool:
            if retry_state.attempt_number > self.max_retries:
                return True
            # Retry only while the rest of the chain keeps its share of the budget.
            return retry_state.upcoming_sleep >= state.slot_end - time.monotonic()

        def before_sleep(retry_state: RetryCallState) -> None:
            exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
            assert isinstance(exc, _AttemptFailed)
            self._decide(
                exc, state, Decision.RETRY_SAME_MODEL, to_model=candidate.ref, to_profile=profile.name
            )

        first: list[_AttemptFailed] = [failure]
        opened: _Opened | None = None
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(lambda exc: self._retry_same(exc, state)),
            wait=self._retry_wait,
            stop=stop,
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                if first:
                    raise first.pop()  # the attempt already made, so tenacity counts it
                opened = await self._open(candidate, profile, state, probe=probe)
        assert opened is not None
        return opened

    def _tokens_streamed(self, provider: str) -> Any:
        child = self._token_counters.get(provider)
        if child is None:
            child = self._token_counters[provider] = metrics.TOKENS_STREAMED.labels(provider)
        return child

    def _stall(self, configured_s: float, limit: float) -> tuple[float, bool]:
        """The wait allowed for a token: ``configured_s``, or what is left
        until ``limit`` (monotonic) when that is shorter (then ``True``: the
        wait is cut by the run's budget, not by the model's own timer)."""
        left = max(limit - time.monotonic(), 0.0)
        return (configured_s, False) if configured_s <= left else (left, True)

    def _idle(self, state: _State) -> tuple[float, bool]:
        """The wait allowed between tokens once an answer started: the idle
        timer, or half of what is left while another model could still
        answer (a model that stalls mid-answer leaves the rest to the chain)."""
        if not state.remaining or not self._others_left(state):
            return self.idle_timeout_s, False
        return self._stall(self.idle_timeout_s, time.monotonic() + state.remaining_s() / 2)

    async def _read(
        self,
        stream: AsyncIterator[Chunk],
        watchdog: _Watchdog,
        candidate: Candidate,
        state: _State,
        stall_s: float,
        *,
        first: bool,
        cut: bool = False,
    ) -> Chunk | None:
        """The next chunk within ``stall_s`` and the deadline (None at the end).

        Raises:
            ProviderError: stalled (``stalled`` = "ttft" or "idle";
                ``budget_cut`` when ``stall_s`` was the run budget's share).
            DeadlineExceeded: the request's deadline passed.
        """
        if state.remaining_s() <= 0:
            raise self._deadline_error(state, candidate)
        watchdog.arm(stall_s)
        try:
            return await anext(stream)
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            fired = watchdog.take()
            if fired == "deadline":
                raise self._deadline_error(state, candidate) from None
            if fired == "stall":
                share = " (its share of the run's time budget)" if cut else ""
                raise ProviderError(
                    f"{candidate.ref}: no {'first ' if first else ''}token within {stall_s:.3g}s{share}",
                    stalled="ttft" if first else "idle",
                    budget_cut=cut,
                ) from None
            raise
        finally:
            watchdog.disarm()

    async def _open(
        self, candidate: Candidate, profile: AuthProfile, state: _State, *, probe: bool
    ) -> _Opened:
        """Start the call and wait for the first token (or the end).

        Raises:
            _AttemptFailed: the call failed or stalled before its first token.
            DeadlineExceeded: the request's deadline passed.
        """
        started_at = time.time()
        state.request.model = candidate.model
        self.profiles.use(profile, state.session)
        stream = self.providers[candidate.provider].stream(state.request, profile.api_key())
        watchdog = _Watchdog(state.deadline)
        buffered: list[Chunk] = []
        started = time.perf_counter()
        first_s, first_cut = self._stall(self.ttft_timeout_s, state.slot_end)
        idle_s, idle_cut = self.idle_timeout_s, False
        alive = False  # a first token of any kind came: from then on the idle timer applies
        try:
            while True:
                if alive:
                    chunk = await self._read(
                        stream, watchdog, candidate, state, idle_s, first=False, cut=idle_cut
                    )
                else:
                    chunk = await self._read(
                        stream, watchdog, candidate, state, first_s, first=True, cut=first_cut
                    )
                if chunk is None:
                    return _Opened(None, buffered, watchdog, started_at, idle_s, idle_cut)
                if not alive:
                    alive = True
                    idle_s, idle_cut = self._idle(state)
                if chunk.kind == "progress":  # tool-call arguments or reasoning under way
                    continue
                buffered.append(chunk)
                if chunk.kind in ("text", "tool_call"):
                    metrics.TIME_TO_FIRST_TOKEN_SECONDS.labels(candidate.provider).observe(
                        time.perf_counter() - started
                    )
                    return _Opened(stream, buffered, watchdog, started_at, idle_s, idle_cut)
        except ProviderError as exc:
            watchdog.close()
            await stream.aclose()  # type: ignore[attr-defined]
            raise self._failed(candidate, profile, exc, started_at, streamed=False, probe=probe) from None
        except BaseException:
            watchdog.close()
            await stream.aclose()  # type: ignore[attr-defined]
            raise

    # ------------------------------------------------------------ decisions

    def _failed(
        self,
        candidate: Candidate,
        profile: AuthProfile,
        exc: ProviderError,
        started_at: float,
        *,
        streamed: bool,
        probe: bool,
    ) -> _AttemptFailed:
        exc.redact(profile.api_key())  # some providers quote the key they refused
        verdict = classify_failure(exc, candidate.model)
        log.warning(
            "%s (auth profile %s) failed: %s [%s] %s",
            candidate.ref,
            profile.name,
            verdict.reason,
            verdict.rule,
            exc.message,
        )
        return _AttemptFailed(candidate, profile, exc, verdict, started_at, streamed=streamed, probe=probe)

    @staticmethod
    def _cooldown_key(failure: _AttemptFailed) -> CooldownKey | None:
        """The key ``failure`` cools down (None: it sets no cooldown)."""
        scope = policy_for(failure.verdict.reason).scope
        if scope == "model_or_profile":
            scope = "profile" if failure.verdict.key_wide else "model"
        provider, profile = failure.candidate.provider, failure.profile.name
        if scope == "model":
            return CooldownKey(provider, profile, failure.candidate.model)
        if scope == "profile":
            return CooldownKey(provider, profile, "")
        return None

    def _cool(self, failure: _AttemptFailed, state: _State) -> None:
        """Apply ``failure``'s cooldown to the cache (once per failure; a
        second failure of the same request on the same key does not escalate)."""
        if failure.cooled:
            return
        failure.cooled = True
        if failure.error.budget_cut:
            return  # cut short by this run's budget: says nothing about the model
        key = self._cooldown_key(failure)
        if key is None:
            return
        failure.repeat = key in state.escalated
        state.escalated.add(key)
        state.probed_keys.add(key)  # this request has its answer about that key
        provider = failure.candidate.provider
        failure.cooldown_key = key
        failure.cooldown = self.store.apply_failure(key, self._failure_record(failure))
        metrics.COOLDOWNS_TOTAL.labels(provider, failure.verdict.reason).inc()

    @staticmethod
    def _failure_record(failure: _AttemptFailed) -> Failure:
        return Failure(
            reason=failure.verdict.reason,
            message=failure.verdict.detail or failure.error.message,
            retry_after_s=failure.verdict.retry_after_s,
            attempt_started_at=failure.started_at,
            at=failure.failed_at,
            probe=failure.probe,
            repeat=failure.repeat,
        )

    def _decide(
        self,
        failure: _AttemptFailed,
        state: _State,
        decision: Decision,
        *,
        to_model: str = "",
        to_profile: str = "",
    ) -> None:
        """Record one decision: cooldown (database), lifecycle event, metrics."""
        self._cool(failure, state)
        reason = failure.verdict.reason
        metrics.ROUTER_DECISIONS_TOTAL.labels(reason, decision).inc()
        if decision in SWITCHES:
            metrics.FAILOVERS_TOTAL.labels(reason).inc()
        elif decision in RETRIES:
            kind = "same_model" if decision == Decision.RETRY_SAME_MODEL else "auth_profile"
            metrics.ROUTER_RETRIES_TOTAL.labels(reason, kind).inc()
        else:
            metrics.ROUTER_ABORTS_TOTAL.labels(reason, decision).inc()
        event = self._event(failure, state, decision, to_model, to_profile)
        if failure.cooldown_key is not None:
            self.store.enqueue_failure(failure.cooldown_key, self._failure_record(failure), event)
            failure.cooldown_key = None  # written once, with the first decision about it
        else:
            self.store.record_event(event)

    def _event(
        self, failure: _AttemptFailed, state: _State, decision: Decision, to_model: str, to_profile: str
    ) -> common_pb2.LifecycleEvent:
        run = state.run
        event = common_pb2.LifecycleEvent(
            type=FAILOVER_EVENT,
            org_id=run.org_id,
            session_key=run.session_key,
            agent_id=state.agent_id,
            run_id=run.run_id,
            task_id=run.task_id,
            source=self.instance_id,
            model=common_pb2.ModelLifecycleData(
                model=failure.candidate.ref,
                from_model=failure.candidate.ref,
                to_model=to_model,
                reason=failover_reason_value(failure.verdict.reason),
                provider=failure.candidate.provider,
                auth_profile=failure.profile.name,
                to_auth_profile=to_profile,
                message=(failure.verdict.detail or failure.error.message)[:500],
                decision=decision,
            ),
        )
        if run.session_id:
            with contextlib.suppress(ValueError):
                event.session_id = str(uuid.UUID(run.session_id))
        event.time.FromNanoseconds(time.time_ns())
        if failure.cooldown is not None:
            fill_cooldown(event, failure.cooldown)
        return event

    # ------------------------------------------------------------ errors

    def _where(self, failure: _AttemptFailed) -> str:
        return failure.error.url or f"provider {failure.candidate.provider!r}"

    def _abort_error(self, failure: _AttemptFailed, state: _State) -> RunyardError:
        verdict, candidate = failure.verdict, failure.candidate
        where = self._where(failure)
        metadata = {"failover_reason": verdict.reason, "model": candidate.ref, "url": failure.error.url}
        if verdict.reason == FailoverReason.ENDPOINT_NOT_FOUND:
            answered = f"HTTP {failure.error.status}" if failure.error.status else "an unexpected answer"
            message = (
                f"{where} answered {answered} that is not a model error ({verdict.detail}): the endpoint "
                f"does not exist there; check providers.{candidate.provider}.base_url"
            )
        elif verdict.reason == FailoverReason.FORMAT:
            blamed = f" (field {verdict.param!r})" if verdict.param else ""
            message = (
                f"{where} rejected the request for {candidate.ref} as malformed{blamed}: {verdict.detail}"
            )
            if verdict.param:
                metadata["provider_field"] = verdict.param
        elif verdict.reason == FailoverReason.CONTEXT_OVERFLOW:
            if state.after_compaction:
                message = (
                    f"the prompt is too long for {candidate.ref} ({verdict.detail}) even after compacting "
                    f"the session, and agent {state.agent_id!r} has no larger model left in "
                    f"agents.{state.agent_id}.context_window_chain; reset the session or add a larger model"
                )
            else:
                message = (
                    f"the prompt is too long for {candidate.ref} ({verdict.detail}) and agent "
                    f"{state.agent_id!r} has no larger model left in "
                    f"agents.{state.agent_id}.context_window_chain; reset or compact the session"
                )
        else:
            message = (
                f"{candidate.ref} refused the request under its content policy ({verdict.detail}) and agent "
                f"{state.agent_id!r} has no model left in agents.{state.agent_id}.content_policy_chain"
            )
        return FailedPrecondition(message, reason=verdict.reason, metadata=metadata)

    def _deadline_error(self, state: _State, candidate: Candidate) -> RunyardError:
        left = ""
        if state.budget_s * 1000 < state.run_budget_ms - 50:
            left = f" ({state.budget_s:.2f}s of it were left for this model call)"
        now = time.time()
        earlier = [self._outcome(item, now) for ref, item in state.outcomes.items() if ref != candidate.ref]
        if earlier:
            left += "; earlier: " + "; ".join(o.describe(now) for o in earlier)
        return DeadlineExceeded(
            f"the run's time budget of {state.run_budget_ms} ms ran out while waiting for "
            f"{candidate.ref}{left}",
            reason="ROUTER_DEADLINE",
            metadata={"model": candidate.ref},
        )

    def _outcome(self, item: _AttemptFailed | _Outcome, now: float) -> _Outcome:
        if isinstance(item, _Outcome):
            return item
        cooldown = item.cooldown
        until = cooldown.until if cooldown is not None and cooldown.active(now) else None
        return _Outcome(
            item.candidate.ref,
            item.verdict.reason,
            item.verdict.detail or item.error.message,
            until,
            cooldown is not None and cooldown.health_at(now) == DISABLED,
            profile=item.profile.name,
        )

    def _chain_error(
        self, state: _State, reason: str, head: str, extra: Sequence[Candidate] = ()
    ) -> RunyardError:
        """ALL_MODELS_FAILED / ALL_MODELS_COOLING: every model with why and
        until when (this request's failures and skips, then ``extra``
        cooling candidates). UNAVAILABLE with RetryInfo (the first cooldown
        that waiting ends) when waiting may help, else FAILED_PRECONDITION
        (``retryable`` false: a bad key, no balance, a missing model)."""
        now = time.time()
        outcomes = {ref: self._outcome(item, now) for ref, item in state.outcomes.items()}
        for candidate in extra:
            if candidate.ref not in outcomes and (cooling := self._cooling(candidate, now)) is not None:
                outcomes[candidate.ref] = cooling
        listed = list(outcomes.values())
        last = state.last
        metadata = {
            "models": ",".join(o.ref for o in listed),
            "reasons": ",".join(o.reason for o in listed),
            "until": ",".join(_utc(o.until) if o.until is not None and o.until > now else "" for o in listed),
            "failover_reason": last.verdict.reason
            if last
            else (listed[0].reason if listed else FailoverReason.UNKNOWN),
        }
        if last is not None:
            metadata["model"] = last.candidate.ref
        message = f"{head}: " + "; ".join(o.describe(now) for o in listed) if listed else head
        if listed and not any(o.retryable() for o in listed):
            return FailedPrecondition(message, reason=reason, metadata=metadata, retryable=False)
        waits = [o.until - now for o in listed if o.retryable() and o.until is not None and o.until > now]
        retry_after = min(waits) if waits else (last.verdict.retry_after_s if last else None)
        return Unavailable(message, reason=reason, retry_after_s=retry_after, metadata=metadata)

    def _exhausted_error(self, state: _State) -> RunyardError:
        return self._chain_error(
            state, "ALL_MODELS_FAILED", f"every model of agent {state.agent_id!r} failed"
        )

    def _cooling_error(self, state: _State, cooling: _AllCooling) -> RunyardError:
        return self._chain_error(
            state,
            "ALL_MODELS_COOLING",
            f"every remaining model of agent {state.agent_id!r} is cooling down and none may be probed now",
            cooling.candidates,
        )

    # ------------------------------------------------------------ status

    def status(self, *, include_unconfigured: bool = True, now: float | None = None) -> list[StatusRow]:
        """Every provider / auth profile / model with its effective state:
        one row per profile with ``model == ""`` (the profile's own state),
        then one per model (the worst of the model, profile and
        provider-wide model keys). Models outside the configuration (request
        overrides) are included while they are cooling, when
        ``include_unconfigured``."""
        now = time.time() if now is None else now
        extra: dict[str, set[str]] = {}
        if include_unconfigured:
            for state in self.store.states():
                if state.key.model and state.key.provider in self.config.providers and state.active(now):
                    extra.setdefault(state.key.provider, set()).add(state.key.model)
        rows: list[StatusRow] = []
        for provider in sorted(self.config.providers):
            models = list(self.catalog.get(provider, []))
            models += sorted(extra.get(provider, set()) - set(models))
            for profile in self.profiles.names(provider):
                rows.append(self._row(provider, profile, "", [CooldownKey(provider, profile, "")], now))
                for model in models:
                    rows.append(
                        self._row(
                            provider, profile, model, list(self.store.keys_for(provider, profile, model)), now
                        )
                    )
        return rows

    def _row(self, provider: str, profile: str, model: str, keys: list[CooldownKey], now: float) -> StatusRow:
        states = [s for s in (self.store.get(k) for k in keys) if s is not None]
        active = [s for s in states if s.active(now)]
        worst: CooldownState | None
        if active:
            worst = max(active, key=lambda s: s.until or 0)
            health, until = worst.health, worst.until
        else:
            health, until = OK, None
            worst = max(states, key=lambda s: s.last_failure_at or 0, default=None)
        return StatusRow(
            provider=provider,
            profile=profile,
            model=model,
            health=health,
            until=until,
            last_reason=worst.last_reason if worst else "",
            last_message=worst.last_message if worst else "",
            failure_count=worst.failure_count if worst else 0,
            last_failure_at=worst.last_failure_at if worst else None,
        )
