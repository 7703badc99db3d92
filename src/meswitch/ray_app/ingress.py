"""The ingress deployment: ``meswitch.server``'s FastAPI app (same routes, errors, SSE) over the replicas.

The front (:mod:`meswitch.front`, with the store's router) runs here, so a request reaches the
replicas already naming its expert: that name is the multiplexed model id Ray Serve routes on.
Responses carry ``x-meswitch-replica`` beside ``x-meswitch-expert``.
"""

from __future__ import annotations

from typing import Any

from meswitch.front.routers import load_store_router
from meswitch.front.routing import Front
from meswitch.ray_app.config import RayAppConfig
from meswitch.ray_app.remote import RemoteEngine, RemoteHandle
from meswitch.server.serving import OpenAIServing

REPLICA_HEADER = "x-meswitch-replica"


class ReplicaServing(OpenAIServing):
    """:class:`OpenAIServing` that also names the engine replica that answered."""

    def _headers(self, handle: Any) -> dict[str, str]:
        headers = super()._headers(handle)
        if isinstance(handle, RemoteHandle) and handle.replica:
            headers[REPLICA_HEADER] = handle.replica
        return headers


class Ingress:
    """State of the ingress replica; :func:`ingress_deployment` wraps it with ``serve.ingress``."""

    def __init__(self, replicas: Any, config: RayAppConfig, router: Any = "auto"):
        from meswitch.store import DeltaStore

        store = DeltaStore.open(config.store)
        if not config.router:
            router = None
        elif router == "auto":
            router = load_store_router(store)
        self.config = config
        self.remote = RemoteEngine(replicas, store.experts, config.max_pending)
        self.front = Front(store.experts, router, max_queued=config.max_pending)

    def __serve_build_asgi_app__(self) -> Any:
        """Called by Ray Serve on the replica after ``__init__``: the ASGI app it serves."""
        from meswitch.server.metrics import ServerMetrics
        from meswitch.server.routes import build_app

        server_config = self.config.server_config()
        app = build_app(ReplicaServing(self.remote, self.front, server_config, ServerMetrics()), server_config)
        app.state.engine, app.state.front = self.remote, self.front
        return app

    def __del__(self) -> None:
        remote, front = getattr(self, "remote", None), getattr(self, "front", None)
        if remote is not None:
            remote.shutdown()
        if front is not None:
            front.close()


def ingress_deployment(config: RayAppConfig) -> Any:
    """The Serve deployment of :class:`Ingress` (one replica: it only parses, routes and relays)."""
    from ray import serve

    return serve.deployment(
        serve.ingress()(Ingress), name="MeswitchIngress", num_replicas=1,
        max_ongoing_requests=max(256, 2 * config.max_pending), ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=5.0,
    )

