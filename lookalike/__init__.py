"""The ``lookalike`` command: the composition root that wires api/, worker/ and shared/.

``lookalike.cli`` parses the command line; ``serve`` supervises Redis, a worker and the API on
one machine; ``redis_server`` starts the embedded Redis; ``stack`` starts a real service of
separate processes (for the end-to-end tests and the service benchmarks); ``bench`` holds
every benchmark (the HTTP load driver, the model-only figures, the service matrix).

Only this package may import from both ``api`` and ``worker``: ``shared`` imports neither.
"""
