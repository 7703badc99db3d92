"""Multi-expert inference: one base model, many compressed expert deltas in one batch.

``Engine`` (continuous batching over a slot KV cache) runs a ``ServingModel`` whose linear layers
(``layers``) add each row's expert delta, grouped by expert (``segments``), through the delta
backend chosen at start-up (``backends``, over the kernels in ``kernels``); ``experts`` keeps the
deltas resident within a memory budget. Requests name their expert (or None: the base); the
router's choice for ``"auto"`` is made before, in :mod:`meswitch.front`. ``background`` runs an
``Engine`` on its own thread as an ``EngineClient`` (``client``), the interface the HTTP server uses.
"""

from meswitch.engine.engine import Engine, EngineConfig
from meswitch.engine.request import Completion, Request, Route, StreamEvent, Usage
from meswitch.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "Route", "SamplingParams", "StreamEvent", "Usage"]
