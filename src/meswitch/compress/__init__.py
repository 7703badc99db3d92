"""Compression of expert deltas (W_expert - W_base): pure tensor math, no I/O.

``quant`` builds per-output-channel grids and codes (qparams -> quantize -> dequantize), ``salient``
keeps the activation-weighted worst input channels in float16 (ME-Switch), ``pack`` stores codes
at 1-4 bits per value.
"""
