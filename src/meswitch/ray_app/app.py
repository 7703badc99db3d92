"""Build the Ray Serve application: ``serve run meswitch.ray_app:build_app store=PATH replicas=2``.

Also the ``import_path`` of a Serve config file (examples/ray_serve.yaml), whose ``args`` are
:class:`RayAppConfig` fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meswitch.ray_app.config import RayAppConfig


def application(config: RayAppConfig, router: Any = "auto") -> Any:
    """The bound application: the ingress over ``config.replicas`` engine replicas.

    ``router``: ``"auto"`` loads the store's router at the ingress; or a router object (anything
    with ``route(texts) -> decisions``), e.g. a stand-in in tests; ignored when ``config.router`` is off.
    """
    from meswitch.ray_app.ingress import ingress_deployment
    from meswitch.ray_app.replica import replica_deployment
    from meswitch.store import DeltaStore

    experts = len(DeltaStore.open(config.store).experts)
    replicas = replica_deployment(config, experts).bind(config)
    return ingress_deployment(config).bind(replicas, config, router)


def build_app(args: Mapping[str, Any] | RayAppConfig) -> Any:
    """Ray Serve's application builder: ``args`` from ``serve run`` (strings) or a config file."""
    config = args if isinstance(args, RayAppConfig) else RayAppConfig.from_dict(args)
    return application(config)
