"""meswitch: many fine-tuned experts served from one base model.

Heavy modules (torch, transformers) are imported lazily by the functions that need them, so
``import meswitch`` and ``meswitch --help`` stay instant.
"""

from meswitch.errors import MeswitchError

__all__ = ["MeswitchError", "__version__"]
__version__ = "0.1.0"
