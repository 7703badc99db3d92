"""Multi-expert inference: one base model, many compressed expert deltas in one batch.

``Engine`` (continuous batching over a slot KV cache) runs a ``ServingModel`` whose linear layers
add each row's expert delta (``layers``, ``delta_linear``, grouped by ``segments``); ``experts``
keeps them resident within a memory budget.
"""

from meswitch.engine.engine import Engine, EngineConfig
from meswitch.engine.request import Completion, Request, Route, StreamEvent, Usage
from meswitch.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "EngineConfig", "Request", "Route", "SamplingParams", "StreamEvent", "Usage"]
