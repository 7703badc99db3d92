"""What the router reads of a request."""

from __future__ import annotations

from meswitch.engine.request import Request


def route_text(request: Request) -> str:
    """The text the router classifies: the prompt, else the last user message, else the last message.

    Never raises: a malformed request (no text, messages that are not ``{"role", "content"}`` dicts)
    gives ``""`` or its readable part; the engine then refuses it with a specific error.
    """
    if request.prompt is not None:
        return request.prompt if isinstance(request.prompt, str) else ""
    msgs = request.messages if isinstance(request.messages, list) else []
    msgs = [m for m in msgs if isinstance(m, dict)]
    users = [m.get("content") for m in msgs if m.get("role") == "user"]
    text = users[-1] if users else (msgs[-1].get("content") if msgs else "")
    return text if isinstance(text, str) else ""
