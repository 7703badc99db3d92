"""Errors of the router; each names the store, file, domain or expert it is about."""

from __future__ import annotations

from meswitch.errors import MeswitchError


class RouterError(MeswitchError):
    """Base class of every error the router raises."""


class RouterMismatchError(RouterError):
    """The stored router was trained for another store: another base model, or experts it no longer has."""


class CorruptRouterError(RouterError):
    """A router file is missing, truncated, edited, or its config is not one this meswitch can read."""


class UnmappedDomainError(RouterError):
    """Training labels name a domain that maps to no expert of the store."""


class RouterDataError(RouterError):
    """Training or evaluation text the router cannot use (too few examples, one domain only, ...)."""
