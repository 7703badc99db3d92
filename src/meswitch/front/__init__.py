"""The routing front layer: a request's expert is settled here, before any engine sees it.

``routing`` (:class:`Front`: a name is checked, ``"auto"`` goes to the router, the decision becomes a
``Route``), ``text`` (:func:`route_text`, what the router reads), ``routers`` (the ``Router``
protocol and :func:`load_store_router`), ``routed`` (:class:`RoutedEngine`, routed generation from
Python), ``errors``. The HTTP server and the Ray ingress use a :class:`Front` in front of their
engine client; engines serve named experts only.
"""

from meswitch.front.errors import RoutingUnavailableError
from meswitch.front.routed import RoutedEngine
from meswitch.front.routers import Router, load_store_router
from meswitch.front.routing import AUTO, Front
from meswitch.front.text import route_text

__all__ = ["AUTO", "Front", "RoutedEngine", "Router", "RoutingUnavailableError", "load_store_router", "route_text"]
