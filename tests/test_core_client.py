"""Both engine cores implement `EngineCoreClient` with compatible signatures (checked with `inspect`, nothing runs).

Compatible: every parameter of the protocol's method exists in the implementation with the same name and kind,
extra parameters of the implementation have defaults, and the return annotations are the same. Attributes of the
protocol must be set by the class (a class attribute, a property, or an assignment in `__init__`)."""

from __future__ import annotations

import inspect
import re

import pytest

from diffgentor.engine.core import EngineCore
from diffgentor.engine.core_client import EngineCoreClient
from diffgentor.engine.tp.executor import TPExecutor

METHODS = sorted(n for n, v in vars(EngineCoreClient).items() if inspect.isfunction(v) and not n.startswith("_"))
ATTRIBUTES = sorted(EngineCoreClient.__annotations__)


def signature_problems(proto, impl) -> list[str]:
    want, have = inspect.signature(proto), inspect.signature(impl)
    problems = []
    for name, p in want.parameters.items():
        q = have.parameters.get(name)
        if q is None:
            problems.append(f"missing parameter {name!r}")
        elif q.kind != p.kind:
            problems.append(f"parameter {name!r} is {q.kind.description}, the protocol says {p.kind.description}")
    for name, q in have.parameters.items():
        if name not in want.parameters and q.default is inspect.Parameter.empty and q.kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            problems.append(f"extra parameter {name!r} has no default")
    if str(have.return_annotation) != str(want.return_annotation):
        problems.append(f"returns {have.return_annotation}, the protocol says {want.return_annotation}")
    return problems


def sets_attribute(cls, name: str) -> bool:
    if any(name in vars(k) for k in cls.__mro__[:-1]):
        return True
    init = cls.__dict__.get("__init__")
    return init is not None and re.search(rf"\bself\.{name}\s*(:[^=]+)?=", inspect.getsource(init)) is not None


def test_the_protocol_lists_the_driver_interface():
    assert {"add_request", "add_processed", "abort", "step", "has_unfinished", "needs_release", "run_until_done",
            "poll_failures", "snapshot", "close"} <= set(METHODS)
    assert {"results", "failed", "num_blocks"} <= set(ATTRIBUTES)


@pytest.mark.parametrize("cls", [EngineCore, TPExecutor], ids=lambda c: c.__name__)
def test_implements_engine_core_client(cls):
    problems = []
    for name in METHODS:
        impl = getattr(cls, name, None)
        if not callable(impl):
            problems.append(f"{name}: missing")
            continue
        problems += [f"{name}: {p}" for p in signature_problems(getattr(EngineCoreClient, name), impl)]
    problems += [f"attribute {a}: never set" for a in ATTRIBUTES if not sets_attribute(cls, a)]
    assert not problems, f"{cls.__name__} does not implement EngineCoreClient:\n" + "\n".join(problems)


def test_the_checker_catches_a_mismatch():
    class Bad:
        def step(self, budget: int) -> list:
            return []

    assert signature_problems(EngineCoreClient.step, Bad.step) == [
        "extra parameter 'budget' has no default", "returns list, the protocol says list[EngineEvent]"]
    assert not sets_attribute(Bad, "results")
