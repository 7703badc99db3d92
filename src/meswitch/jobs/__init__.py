"""Jobs: the steps a command runs, built from the libraries (``compress``, ``eval``, ``store``, ``router``, ``zoo``).

A job loads what a library needs (checkpoints, text, a store), calls it, measures the result with
another library, and saves it; the libraries themselves never load files for each other, so they
depend on each other one way only. The CLI is a thin layer over these functions.

- :mod:`meswitch.jobs.compress_store`: ``compress_expert`` (compress + fidelity) and ``compress_into_store``
- :mod:`meswitch.jobs.store_fidelity`: ``store_fidelity``, a stored expert against its checkpoint
- :mod:`meswitch.jobs.zoo_store`: ``build_zoo_store``, the reference zoo's experts kept compressed in a store
- :mod:`meswitch.jobs.store_router`: ``ensure_router``, a store's router reused or trained in-process
"""
