"""Every benchmark of lookalike, in one place.

* ``service``: ``lookalike bench``, the HTTP load driver (real uploads, long polls);
* ``http_lite``: its lean HTTP/1.1 client;
* ``model``: ``lookalike bench --model-only``, the encoder, preprocessing and search in process;
* ``matrix``: ``python -m lookalike.bench.matrix``, the service figures of docs/benchmarks.md,
  each configuration a fresh stack of real processes.
"""
