"""An engine replica: one meswitch :class:`Engine` per Ray Serve replica, batching every expert it holds.

Ray Serve's model multiplexing is keyed by expert name: the ingress calls
``handle.options(multiplexed_model_id=expert)``, Ray prefers a replica that already holds that
expert, and the replica's multiplexed loader (at most ``experts_per_replica`` per replica, least
recently used out first) pins the expert's compressed delta in the engine. Unlike Ray's own
multiplexing of whole models, requests for all the experts a replica holds share one batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from meswitch.engine.background import BackgroundEngine
from meswitch.engine.engine import Engine
from meswitch.engine.errors import BudgetError
from meswitch.engine.request import Request, StreamEvent
from meswitch.ray_app.config import RayAppConfig
from meswitch.ray_app.messages import Accepted, RemoteError

log = logging.getLogger(__name__)


class ExpertLease:
    """An expert pinned in a replica's engine while Ray Serve counts it as loaded there.

    Ray calls ``__del__`` when it unloads the expert (the least recently used, beyond K): the pin is
    dropped and the delta evicted unless a running request still uses it (the engine's residency
    budget then decides). Idempotent: Python may call ``__del__`` again at collection.
    """

    def __init__(self, engine: BackgroundEngine, expert: str):
        self.engine, self.expert = engine, expert
        self._released = threading.Event()

    def __del__(self) -> None:
        if self._released.is_set() or not self.engine.alive:
            return
        self._released.set()
        self.engine.call(lambda e: _unpin(e, self.expert))


def _unpin(engine: Engine, expert: str) -> None:
    engine.pool.unpin(expert)
    try:
        engine.pool.evict(engine.pool.lookup(expert))
    except BudgetError:
        log.info("expert %s unloaded by Ray while still in use; it stays resident for now", expert)


class EngineReplica:
    """The replica's state and methods; :func:`replica_deployment` adds the multiplexed loader and Serve options."""

    def __init__(self, config: RayAppConfig):
        import ray
        import torch
        from ray import serve

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        engine = Engine.from_store(config.store, base=config.base, config=config.engine_config())
        self.engine = BackgroundEngine(engine, max_pending=config.max_ongoing_requests).start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        log.info("meswitch replica %s: %d experts in the store", self.replica_id, len(engine.experts))

    async def expert(self, expert_id: str) -> ExpertLease:  # replaced by the multiplexed loader
        raise NotImplementedError

    async def _lease(self, expert: str) -> ExpertLease:
        await asyncio.wrap_future(self.engine.call(lambda e: e.pool.pin(expert)))
        return ExpertLease(self.engine, expert)

    async def generate(self, request: Request) -> AsyncIterator[Accepted | RemoteError | StreamEvent]:
        """Run ``request`` on the expert Ray multiplexed it to: Accepted, then events (or one RemoteError)."""
        from ray import serve

        try:
            request.expert = serve.get_multiplexed_model_id() or request.expert
            if request.expert is not None:
                await self.expert(request.expert)
            handle = await self.engine.submit_async(request)
        except Exception as exc:  # noqa: BLE001 - refused requests go back to the ingress as data
            yield RemoteError.of(exc)
            return
        yield Accepted(handle.request_id, handle.expert, self.replica_id)
        try:
            async for ev in handle:
                yield ev
        finally:  # the ingress went away (client disconnect) or the stream ended: free the batch slot
            handle.cancel()

    async def info(self) -> dict[str, Any]:
        """This replica's id, actor name, pending requests and engine stats (resident experts included)."""
        stats = await asyncio.wrap_future(self.engine.call(lambda e: e.stats()))
        return {"replica": self.replica_id, "actor_name": self.actor_name, "pending": self.engine.pending,
                "stats": stats}

    def check_health(self) -> None:
        """Ray Serve's health check: the engine thread must be running."""
        if not self.engine.alive:
            raise RuntimeError("the engine thread stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def replica_deployment(config: RayAppConfig, experts: int) -> Any:
    """The Serve deployment of :class:`EngineReplica` for ``config`` (``experts``: how many the store holds)."""
    from ray import serve

    k = min(config.experts_per_replica or experts, max(experts, 1))

    class MeswitchEngine(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=k)
        async def expert(self, expert_id: str) -> ExpertLease:
            return await self._lease(expert_id)

    return serve.deployment(
        MeswitchEngine, name="MeswitchEngine", num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus},
        health_check_period_s=config.health_check_period_s, health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    )
