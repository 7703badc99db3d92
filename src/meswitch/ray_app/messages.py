"""What an engine replica streams back to the ingress besides the engine's own ``StreamEvent`` s.

A replica's ``generate`` yields either one :class:`RemoteError` (the request was refused) or an
:class:`Accepted` followed by the request's ``StreamEvent`` s, the last one carrying the
``Completion``. Errors travel as their class name and message, not pickled exceptions: the engine's
exceptions take constructor arguments that pickling would not replay.
"""

from __future__ import annotations

from dataclasses import dataclass

from meswitch.engine import errors as E
from meswitch.engine.request import InvalidPromptError

# Every error a replica may refuse a request with, by class name; others become RuntimeError.
_KNOWN: dict[str, type[Exception]] = {c.__name__: c for c in (
    E.InvalidRequestError, E.ContextLengthError, E.PromptTooLongError, E.UnknownModelError,
    E.EngineOverloadedError, E.BudgetError, E.UnsupportedModelError, E.EngineError, E.EngineStoppedError,
    InvalidPromptError)}


@dataclass(frozen=True)
class Accepted:
    """The replica's engine admitted the request: its id there, the expert it runs on, which replica."""

    request_id: str
    expert: str | None
    replica: str


@dataclass(frozen=True)
class RemoteError:
    """A refused request: the exception's class name and message."""

    kind: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> RemoteError:
        return cls(type(exc).__name__, str(exc))

    def exception(self) -> Exception:
        """The exception again, of the same class when it is one of the engine's (for the same HTTP status)."""
        kind = _KNOWN.get(self.kind)
        if kind is None:
            return RuntimeError(f"{self.kind}: {self.message}")
        exc = kind.__new__(kind)
        Exception.__init__(exc, self.message)  # skip the subclasses' own __init__ signatures
        return exc
