"""meswitch on Ray Serve: one OpenAI-compatible ingress (with the router) over N engine replicas.

``config`` (:class:`RayAppConfig`, the application's settings), ``messages`` (what replicas send
back), ``replica`` (an :class:`Engine` per replica; experts multiplexed onto replicas by Ray Serve),
``remote`` (the ingress's ``EngineClient`` of the replicas), ``ingress`` (the FastAPI app of
``meswitch.server`` over it, with ``meswitch.front`` routing ``auto``), ``app`` (:func:`build_app`
for ``serve run`` and config files), ``launch`` (``meswitch serve --ray``). Needs the ``ray`` extra;
ray is imported only when a deployment is built. See docs/ray.md.
"""

from meswitch.ray_app.app import application, build_app
from meswitch.ray_app.config import RayAppConfig

__all__ = ["RayAppConfig", "application", "build_app"]
