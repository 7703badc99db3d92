"""The stored form of one layer's expert delta, read and written in one place.

:class:`QuantizedDelta` (codes + step sizes + 16-bit salient columns) and :class:`DenseDelta`
(a 16-bit tensor) are the records; :func:`decode` is the one reader of a store's layer tensors and
``record.fields()`` / ``record.meta()`` the one writer. Compression (:mod:`meswitch.compress`)
produces records, the engine (:mod:`meswitch.engine`) serves them.
"""

from meswitch.deltas.grid import dequantize, sign2d_dequantize
from meswitch.deltas.pack import check_bits, pack, packed_cols, unpack
from meswitch.deltas.records import (
    METHODS,
    DeltaFormatError,
    DenseDelta,
    LayerDelta,
    QuantizedDelta,
    decode,
    decode_delta,
)

__all__ = [
    "METHODS",
    "DeltaFormatError",
    "DenseDelta",
    "LayerDelta",
    "QuantizedDelta",
    "check_bits",
    "decode",
    "decode_delta",
    "dequantize",
    "pack",
    "packed_cols",
    "sign2d_dequantize",
    "unpack",
]
