"""The stored form of one layer's expert delta, read and written in one place.

:class:`QuantizedDelta` (codes + step sizes + 16-bit salient columns), :class:`DenseDelta`
(a 16-bit tensor) and :class:`LowRankDelta` (a LoRA adapter's two 16-bit factors) are the records;
:func:`decode` is the one reader of a store's layer tensors and ``record.fields()`` / ``record.meta()``
the one writer. Compression (:mod:`meswitch.compress`)
produces records, the engine (:mod:`meswitch.engine`) serves them.
"""

from meswitch.deltas.grid import dequantize, sign2d_dequantize
from meswitch.deltas.pack import check_bits, pack, packed_cols, unpack
from meswitch.deltas.records import (
    LOW_RANK,
    METHODS,
    DeltaFormatError,
    DenseDelta,
    LayerDelta,
    LowRankDelta,
    QuantizedDelta,
    decode,
    decode_delta,
)

__all__ = [
    "LOW_RANK",
    "METHODS",
    "DeltaFormatError",
    "DenseDelta",
    "LayerDelta",
    "LowRankDelta",
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
