"""Auth profiles: several credentials per provider, rotated LRU, pinned per session.

A provider's profiles come from its configuration (``auth_profiles``: name
-> environment variable, or ``api_key_env`` as the single profile
``default``); keys are read from the environment when used and never
logged. For each request the router takes, among the profiles that are not
cooling down, the one pinned to the session if there is one, else the least
recently used one, and pins it to the session. A failure that rotates the
profile unpins it, so the session moves to the next least recently used one.

Pins and use times live in this process: another router replica may pin a
different profile for the same session, which only matters for providers
that cache prompts per key.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from runyard.common.config import ProviderConfig

__all__ = ["AuthProfile", "AuthProfiles"]

#: Pinned sessions kept per process (least recently pinned dropped first).
MAX_PINS = 100_000


@dataclass(frozen=True, slots=True)
class AuthProfile:
    """One credential of a provider: ``name`` and the environment variable
    ``env`` holding the key (``""``: the provider needs no key)."""

    provider: str
    name: str
    env: str

    def api_key(self) -> str:
        """The key from the environment ("" when unset or not needed)."""
        return os.environ.get(self.env, "") if self.env else ""


class AuthProfiles:
    """Profile choice for every configured provider.

    Args:
        providers: provider name -> its configuration.
        clock: monotonic clock for least-recently-used ordering.
    """

    def __init__(self, providers: Mapping[str, ProviderConfig], clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._profiles: dict[str, tuple[AuthProfile, ...]] = {
            name: tuple(AuthProfile(name, profile, env) for profile, env in config.profiles.items())
            for name, config in providers.items()
        }
        self._last_used: dict[tuple[str, str], float] = {}
        self._pins: OrderedDict[tuple[str, str], str] = OrderedDict()

    def names(self, provider: str) -> list[str]:
        """Profile names of ``provider`` in configuration order."""
        return [p.name for p in self._profiles.get(provider, ())]

    def get(self, provider: str, name: str) -> AuthProfile:
        """The profile ``name`` of ``provider``.

        Raises:
            KeyError: no such provider or profile.
        """
        for profile in self._profiles[provider]:
            if profile.name == name:
                return profile
        raise KeyError(f"provider {provider!r} has no auth profile {name!r}")

    def missing_keys(self) -> list[tuple[str, str, str]]:
        """``(provider, profile, env)`` of profiles whose variable is unset."""
        return [
            (p.provider, p.name, p.env)
            for profiles in self._profiles.values()
            for p in profiles
            if p.env and p.env not in os.environ
        ]

    def ordered(self, provider: str, session: str, usable: Callable[[str], bool]) -> list[AuthProfile]:
        """``provider``'s usable profiles, best first: the session's pinned one,
        then least recently used (configuration order breaks ties)."""
        profiles = [p for p in self._profiles.get(provider, ()) if usable(p.name)]
        if len(profiles) > 1:
            pinned = self._pins.get((session, provider)) if session else None
            order = {p.name: index for index, p in enumerate(self._profiles[provider])}
            profiles.sort(
                key=lambda p: (
                    p.name != pinned,
                    self._last_used.get((provider, p.name), float("-inf")),
                    order[p.name],
                )
            )
        return profiles

    def use(self, profile: AuthProfile, session: str) -> None:
        """Record that ``profile`` serves ``session`` now (LRU time and pin)."""
        self._last_used[(profile.provider, profile.name)] = self.clock()
        if session:
            key = (session, profile.provider)
            if self._pins.get(key) != profile.name:
                self._pins[key] = profile.name
            self._pins.move_to_end(key)
            while len(self._pins) > MAX_PINS:
                self._pins.popitem(last=False)

    def unpin(self, profile: AuthProfile, session: str) -> None:
        """Forget ``session``'s pin if it is ``profile`` (after a failure)."""
        key = (session, profile.provider)
        if session and self._pins.get(key) == profile.name:
            del self._pins[key]

    def pinned(self, provider: str, session: str) -> str | None:
        """The profile name pinned to ``session`` for ``provider``, if any."""
        return self._pins.get((session, provider))
