"""Errors of the inference engine: each names the request, expert, value or limit it is about."""

from __future__ import annotations

from meswitch.errors import MeswitchError


class EngineError(MeswitchError):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request the engine cannot serve as given (empty prompt, bad sampling parameters, ...)."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus ``max_tokens`` do not fit the engine's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, max_context: int):
        self.prompt_tokens, self.max_tokens, self.max_context = prompt_tokens, max_tokens, max_context
        super().__init__(
            f"this engine's maximum context length is {max_context} tokens; the request has "
            f"{prompt_tokens} prompt tokens and asks for up to {max_tokens} more"
        )


class PromptTooLongError(ContextLengthError):
    """The prompt alone has more tokens than the engine's ``max_prompt_tokens``."""

    def __init__(self, prompt_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.max_context = prompt_tokens, 0, limit
        InvalidRequestError.__init__(
            self, f"the prompt has {prompt_tokens} tokens; this server accepts at most {limit} prompt tokens"
        )


class UnknownModelError(InvalidRequestError, LookupError):
    """A request names an expert that the store does not hold.

    ``also``: the other names the caller accepts, listed after the experts (the engine: None, the base).
    """

    def __init__(self, name: str, available: list[str], also: tuple[str, ...] = ("None (the base)",)):
        self.name, self.available = name, sorted(available)
        *head, last = [*(repr(n) for n in self.available), *also] or ["none"]
        listing = f"{', '.join(head)} or {last}" if head else last
        super().__init__(f"no expert {name!r}; available: {listing}")


class UnsupportedModelError(EngineError):
    """The base model's architecture, or a stored delta, is not one the engine can run."""


class BudgetError(EngineError):
    """A memory budget that cannot hold what it must (e.g. smaller than one expert)."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full; try again later."""


class EngineStoppedError(EngineError):
    """The engine is shut down (or shutting down) and takes no more requests."""
