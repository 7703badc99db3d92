"""Multi-expert inference: one base model, many compressed expert deltas in one batch.

``segments`` groups the rows of a batch by expert; ``delta_linear`` computes
``x @ (W_base + delta_e)^T`` for rows of mixed experts from the stored, packed deltas.
"""
