"""Settings of the Ray Serve application, passed to every deployment explicitly (no globals)."""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meswitch.server.config import ServerConfig, api_key_from_env

if TYPE_CHECKING:
    from meswitch.engine.engine import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayAppConfig:
    """What ``meswitch serve --ray``, ``serve run meswitch.ray_app:build_app`` and Serve config files set.

    ``replicas``: engine replicas (each loads the base once); ``experts_per_replica`` (K): experts a
    replica holds at once (None: all of the store's); with fewer than the store holds, Ray Serve's
    model multiplexing sends each request to a replica holding its expert, loading it (and unloading
    the least recently used one) where none does. ``replica_cpus``: Ray CPUs reserved per replica;
    ``torch_threads``: intra-op threads per replica (None: torch's default). ``router``: route
    ``model="auto"`` at the ingress with the store's router. ``max_ongoing_requests``: requests Ray
    sends one replica at once (its engine batches them). Engine and server fields keep the meaning
    they have in :class:`EngineConfig` and :class:`ServerConfig`; ``api_key`` None reads
    ``$MESWITCH_API_KEY`` where the ingress runs.
    """

    store: str
    base: str | None = None
    replicas: int = 1
    experts_per_replica: int | None = None
    replica_cpus: float = 1.0
    torch_threads: int | None = None
    router: bool = True
    max_ongoing_requests: int = 32
    health_check_period_s: float = 2.0
    # engine (per replica)
    max_batch: int = 16
    max_context: int | None = None
    max_prompt_tokens: int | None = None
    max_resident_bytes: int | None = None
    backend: str = "auto"  # EngineConfig.backend
    base_weights: str = "auto"  # EngineConfig.base_weights
    base_gguf: str | None = None  # EngineConfig.base_gguf
    # server (the ingress); defaults are the single-process server's
    api_key: str | None = ServerConfig.api_key
    max_tokens: int = ServerConfig.max_tokens
    default_max_tokens: int = ServerConfig.default_max_tokens
    max_pending: int = ServerConfig.max_pending
    max_body_bytes: int = ServerConfig.max_body_bytes
    body_timeout_s: float = ServerConfig.body_timeout_s
    base_model_id: str | None = ServerConfig.base_model_id

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.experts_per_replica is not None and self.experts_per_replica < 1:
            raise ValueError(f"experts_per_replica must be >= 1 (or None: all), got {self.experts_per_replica}")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")

    @classmethod
    def from_dict(cls, args: Mapping[str, Any]) -> RayAppConfig:
        """From ``serve run ... key=value`` arguments (strings) or a config file's ``args`` (typed).

        Strings are converted to each field's type ("none"/"null" -> None); unknown keys are logged
        and ignored, so a config file written for a later version still deploys.
        """
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            log.warning("meswitch.ray_app: ignoring unknown settings %s", ", ".join(unknown))
        kw = {k: _coerce(k, v, hints[k]) for k, v in args.items() if k in known}
        if "store" not in kw:
            raise ValueError("the Ray application needs `store` (the delta store's path)")
        for key in ("store", "base"):
            if kw.get(key) is not None:
                kw[key] = os.path.expanduser(str(kw[key]))
        return cls(**kw)

    def engine_config(self) -> EngineConfig:
        from meswitch.engine.engine import EngineConfig  # torch: only where an engine is built

        return EngineConfig(max_batch=self.max_batch, max_context=self.max_context,
                            max_prompt_tokens=self.max_prompt_tokens, max_waiting=max(self.max_pending, 1),
                            max_resident_bytes=self.max_resident_bytes, backend=self.backend,
                            base_weights=self.base_weights, base_gguf=self.base_gguf)

    def server_config(self) -> ServerConfig:
        return ServerConfig(api_key=api_key_from_env(self.api_key), max_tokens=self.max_tokens,
                            default_max_tokens=self.default_max_tokens, max_pending=self.max_pending,
                            max_body_bytes=self.max_body_bytes, body_timeout_s=self.body_timeout_s,
                            base_model_id=self.base_model_id)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type: ``int | None`` accepts None, "none" and "12"; bools accept "true"/"false"."""
    if not isinstance(value, str):
        return value
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in kinds and value.strip().lower() in {"none", "null", ""}:
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is bool:
        if value.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if value.strip().lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    try:
        return kind(value)
    except ValueError as e:
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from e
