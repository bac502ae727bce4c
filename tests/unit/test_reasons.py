"""The catalog of error reasons (:mod:`runyard.common.reasons`) against the
source: every reason a service raises is in it with the right gRPC code,
every entry is raised somewhere, and docs/errors.md is generated from it.

The reasons are found by reading ``services/`` with :mod:`ast`, not by
importing it: each call that passes ``reason=`` is either an error (a
:class:`~runyard.common.errors.RunyardError` class, ``RunError`` or
``ErrorInfo``) or one of :data:`NOT_ERRORS`; anything else fails
:func:`test_every_reason_keyword_is_classified`, so a new kind of call
cannot slip by. A reason that is not a literal is followed: module
constants, local assignments, ``dict.get`` on a module-level table, and a
function parameter (through every call of that function). What cannot be
followed must be listed in :data:`INDIRECT`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from runyard.common import errors
from runyard.common.reasons import CATALOG, render
from runyard.router.policy import POLICIES
from tests.support import ROOT

SERVICES = ROOT / "services"

#: Calls with a ``reason=`` keyword that is not an error reason: why a run
#: was cancelled or a session started/ended, a failover reason enum, ...
NOT_ERRORS = frozenset(
    {
        "CancelRunRequest",
        "CancelTaskRequest",
        "Failure",
        "HubDrain",
        "ModelEvent",
        "ModelFailover",
        "ModelLifecycleData",
        "PrunedSession",
        "RunCancel",
        "RunCancelled",
        "RunReleased",
        "SessionEnd",
        "SessionEndData",
        "SessionStart",
        "SessionStartData",
        "WorkerDraining",
    }
)

#: Error messages built field by field (besides the RunyardError classes).
ERROR_MESSAGES = frozenset({"RunError", "ErrorInfo"})

#: ``(file under services/, function)`` -> the reasons a reason that the
#: scan cannot follow carries there; ``None``: it passes on a reason that
#: was raised (and checked) elsewhere, or read from the wire.
INDIRECT: dict[tuple[str, str], frozenset[str] | None] = {
    # The error machinery itself: a RunyardError's own reason, and errors
    # rebuilt from a gRPC status or a RunError that another service raised.
    ("common/errors.py", "to_status_proto"): None,
    ("common/errors.py", "to_run_error"): None,
    ("common/errors.py", "from_rpc_error"): None,
    ("common/errors.py", "from_run_error"): None,
    # The router aborts with the failover reason of the failure: those its
    # policy does not fail over on (docs: README "Router").
    ("router/engine.py", "_abort_error"): frozenset(
        reason for reason, policy in POLICIES.items() if policy.next_model != "yes"
    ),
    # Tasks cascade on the session_end reasons DELETED and RESET only
    # (tasks/sweeper.py filters them; TaskManager.session_ended documents them).
    ("gateway/tasks/sweeper.py", "_session_end"): frozenset({"DELETED", "RESET"}),
}


@dataclass
class Site:
    """One place that raises or builds an error with a reason."""

    where: str
    code: str | None
    reasons: set[str] = field(default_factory=set)


class _Module:
    def __init__(self, path: Path):
        self.rel = path.relative_to(SERVICES).as_posix()
        self.tree = ast.parse(path.read_text(), filename=str(path))
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.constants: dict[str, ast.expr] = {}
        for stmt in self.tree.body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
            ):
                self.constants[stmt.targets[0].id] = stmt.value
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
                self.constants[stmt.target.id] = stmt.value

    def function_of(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node
        return None


class Unresolved(Exception):
    """A reason the scan cannot follow (see :data:`INDIRECT`)."""


def _callee(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


class Scan:
    """Every error reason raised in ``services/`` (generated code aside)."""

    def __init__(self) -> None:
        self.modules = [_Module(p) for p in sorted(SERVICES.rglob("*.py")) if "_proto" not in p.parts]
        self.error_codes: dict[str, str] = {}
        self.default_reasons: dict[str, str] = {}
        for cls in _error_classes():
            self.error_codes[cls.__name__] = cls.code.name
            self.default_reasons[cls.__name__] = cls.default_reason
        self.functions: dict[str, list[tuple[_Module, ast.FunctionDef | ast.AsyncFunctionDef]]] = {}
        for module in self.modules:
            for node in ast.walk(module.tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.setdefault(node.name, []).append((module, node))
        self.sites: list[Site] = []
        self.unclassified: list[str] = []
        self.unresolved: list[str] = []
        self.indirect_used: set[tuple[str, str]] = set()
        self._seen: set[int] = set()  # ids of the nodes being followed (the trees are kept)
        self._scan()

    # ------------------------------------------------------------ the calls

    def _scan(self) -> None:
        for module in self.modules:
            for node in ast.walk(module.tree):
                if not isinstance(node, ast.Call):
                    continue
                keyword = next((k for k in node.keywords if k.arg == "reason"), None)
                name = _callee(node)
                where = f"{module.rel}:{node.lineno}"
                if name in self.error_codes:
                    site = Site(where, self.error_codes[name])
                    if keyword is None:
                        site.reasons.add(self.default_reasons[name])
                    else:
                        site.reasons |= self._values(module, keyword.value)
                    self.sites.append(site)
                elif keyword is None or name in NOT_ERRORS:
                    continue
                elif name in ERROR_MESSAGES or name is None:
                    code = next((k.value for k in node.keywords if k.arg == "code"), None)
                    literal = code.value if isinstance(code, ast.Constant) else None
                    self.sites.append(Site(where, literal, self._values(module, keyword.value)))
                else:
                    self.unclassified.append(f"{where}: {name}(reason=...)")

    # ------------------------------------------------------------ following a value

    def _values(self, module: _Module, expr: ast.expr) -> set[str]:
        try:
            return self._resolve(module, expr)
        except Unresolved as exc:
            function = module.function_of(expr)
            key = (module.rel, function.name if function is not None else "")
            if key in INDIRECT:
                self.indirect_used.add(key)
                return set(INDIRECT[key] or ())
            self.unresolved.append(f"{module.rel}:{expr.lineno}: {ast.unparse(expr)} ({exc})")
            return set()

    def _resolve(self, module: _Module, expr: ast.expr) -> set[str]:
        mark = id(expr)
        if mark in self._seen:
            return set()  # a cycle (``reason = reason or ...``): its other branches count
        self._seen.add(mark)
        try:
            return self._resolve_new(module, expr)
        finally:
            self._seen.discard(mark)

    def _resolve_new(self, module: _Module, expr: ast.expr) -> set[str]:
        if isinstance(expr, ast.Constant):
            if expr.value is None:
                return set()
            if isinstance(expr.value, str):
                return {expr.value}
            raise Unresolved(f"constant {expr.value!r}")
        if isinstance(expr, ast.JoinedStr):
            out = {""}
            for part in expr.values:
                if isinstance(part, ast.FormattedValue):
                    options = self._values(module, part.value)
                else:
                    assert isinstance(part, ast.Constant)
                    options = {str(part.value)}
                out = {a + b for a in out for b in options}
            return out
        if isinstance(expr, ast.BoolOp):
            return set().union(*(self._resolve(module, value) for value in expr.values))
        if isinstance(expr, ast.IfExp):
            return self._resolve(module, expr.body) | self._resolve(module, expr.orelse)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr == "get":
            table = self._table(module, expr.func.value)
            default = self._resolve(module, expr.args[1]) if len(expr.args) > 1 else set()
            return table | default
        if isinstance(expr, ast.Subscript):
            return self._table(module, expr.value)
        if isinstance(expr, ast.Name):
            return self._name(module, expr)
        raise Unresolved(type(expr).__name__)

    def _table(self, module: _Module, expr: ast.expr) -> set[str]:
        """The values of a module-level dict literal."""
        if isinstance(expr, ast.Name) and isinstance(module.constants.get(expr.id), ast.Dict):
            table = module.constants[expr.id]
            assert isinstance(table, ast.Dict)
            return set().union(*(self._resolve(module, value) for value in table.values))
        raise Unresolved(f"lookup in {ast.unparse(expr)}")

    def _name(self, module: _Module, name: ast.Name) -> set[str]:
        function = module.function_of(name)
        if function is not None:
            assigned = [
                node.value
                for node in ast.walk(function)
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                and node.value is not None
                and any(
                    isinstance(t, ast.Name) and t.id == name.id
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                )
            ]
            if assigned:
                return set().union(*(self._resolve(module, value) for value in assigned))
            params = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
            if name.id in params or name.id in [a.arg for a in function.args.kwonlyargs]:
                return self._arguments(function.name, name.id)
        if name.id in module.constants:
            return self._resolve(module, module.constants[name.id])
        for other in self.modules:  # imported from another module
            if name.id in other.constants:
                return self._resolve(other, other.constants[name.id])
        raise Unresolved(f"name {name.id}")

    def _arguments(self, function_name: str, param: str) -> set[str]:
        """What every call of ``function_name`` passes as ``param``."""
        out: set[str] = set()
        for module in self.modules:
            for node in ast.walk(module.tree):
                if not isinstance(node, ast.Call) or _callee(node) != function_name:
                    continue
                for defined_in, function in self.functions.get(function_name, []):
                    del defined_in
                    names = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
                    if isinstance(node.func, ast.Attribute) and names and names[0] in ("self", "cls"):
                        names = names[1:]
                    keyword = next((k for k in node.keywords if k.arg == param), None)
                    if keyword is not None:
                        out |= self._values(module, keyword.value)
                    elif param in names and names.index(param) < len(node.args):
                        out |= self._values(module, node.args[names.index(param)])
                    break
        return out

    # ------------------------------------------------------------ results

    def reasons(self) -> dict[str, set[str | None]]:
        """reason -> the gRPC codes it is raised with (None: not a literal)."""
        out: dict[str, set[str | None]] = {}
        for site in self.sites:
            for reason in site.reasons:
                out.setdefault(reason, set()).add(site.code)
        return out

    def where(self, reason: str) -> Iterator[str]:
        return (site.where for site in self.sites if reason in site.reasons)


def _error_classes() -> list[type[errors.RunyardError]]:
    found: list[type[errors.RunyardError]] = [errors.RunyardError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


@pytest.fixture(scope="module")
def scan() -> Scan:
    return Scan()


def test_every_reason_keyword_is_classified(scan: Scan) -> None:
    assert scan.unclassified == [], (
        "calls with reason= that are neither errors nor listed in NOT_ERRORS (add the callee to one)"
    )


def test_every_reason_is_followed_to_its_values(scan: Scan) -> None:
    assert scan.unresolved == [], "reasons the scan cannot follow: use a literal, or add them to INDIRECT"
    assert set(INDIRECT) == scan.indirect_used, "INDIRECT entries that no longer match a call site"


def test_every_reason_raised_is_in_the_catalog(scan: Scan) -> None:
    missing = {r: sorted(scan.where(r)) for r in scan.reasons() if r not in CATALOG}
    assert missing == {}, (
        "add these reasons to runyard.common.reasons.CATALOG (then regenerate docs/errors.md)"
    )


def test_every_catalog_entry_is_raised(scan: Scan) -> None:
    assert sorted(set(CATALOG) - set(scan.reasons())) == []


def test_catalog_codes_match_the_raising_code(scan: Scan) -> None:
    wrong = {
        reason: sorted(code for code in codes if code is not None)
        for reason, codes in scan.reasons().items()
        if reason in CATALOG and codes - {None} != set(CATALOG[reason].codes)
    }
    assert wrong == {}


def test_catalog_entries_are_well_formed() -> None:
    for reason, entry in CATALOG.items():
        assert reason == reason.upper() and " " not in reason, reason
        assert entry.codes and set(entry.codes) <= set(grpc.StatusCode.__members__), reason
        assert entry.meaning and "\n" not in entry.meaning and "|" not in entry.meaning, reason


def test_docs_errors_md_is_generated_from_the_catalog() -> None:
    assert (ROOT / "docs" / "errors.md").read_text() == render(), (
        "docs/errors.md is stale: python -m runyard.common.reasons"
    )


def test_check_flag_exits_non_zero_when_stale(tmp_path: Path) -> None:
    stale = tmp_path / "errors.md"
    stale.write_text("old\n")
    command = [sys.executable, "-m", "runyard.common.reasons", "--check", "--output", str(stale)]
    assert subprocess.run(command, capture_output=True, check=False).returncode != 0
    assert subprocess.run([*command[:3], "--output", str(stale)], check=False).returncode == 0
    assert stale.read_text() == render()
    assert subprocess.run(command, capture_output=True, check=False).returncode == 0
