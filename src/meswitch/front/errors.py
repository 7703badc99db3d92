"""Errors of the routing front layer."""

from __future__ import annotations

from meswitch.engine.errors import InvalidRequestError


class RoutingUnavailableError(InvalidRequestError):
    """A request for ``"auto"`` where no router is loaded (the store has none, or routing is off)."""
