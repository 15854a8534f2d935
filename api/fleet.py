"""What the workers announce about themselves (worker.heartbeat), as the API sees it.

Read from Redis at most once a second per API process and shared by every request: readiness,
the galleries jobs may name, and whether text search is on somewhere (each worked out once per
read, not per request).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from shared.images import InputSpec
from shared.jobs import AsyncJobStore

# Live workers' records expire 15 s after their last beat; a failed worker's stays 5 minutes
# (worker.heartbeat), so /readyz can still say why it failed. The records' own expiry decides.
HEARTBEAT_WINDOW_S = 300.0
CACHE_S = 1.0


@dataclass(frozen=True)
class FleetView:
    workers: list[dict[str, Any]] = field(default_factory=list)

    @cached_property
    def ready(self) -> list[dict[str, Any]]:
        return [w for w in self.workers if w.get("state") == "ready"]

    @cached_property
    def galleries(self) -> dict[str, dict[str, Any]]:
        """The galleries every ready worker serves, by name: all workers take jobs from the
        same queue, so a gallery only some of them hold would fail on the others."""
        ready = self.ready
        found: dict[str, dict[str, Any]] = {}
        for worker in ready:
            for gallery in worker.get("galleries") or []:
                found.setdefault(str(gallery.get("name")), gallery)
        for worker in ready:
            held = {str(g.get("name")) for g in worker.get("galleries") or []}
            found = {name: g for name, g in found.items() if name in held}
        return found

    @cached_property
    def default_gallery(self) -> str | None:
        """The default gallery of the ready workers, if they all have the same."""
        defaults = {str(w.get("gallery")) for w in self.ready if w.get("gallery")}
        return defaults.pop() if len(defaults) == 1 else None

    @cached_property
    def input_spec(self) -> InputSpec | None:
        """The model input every ready worker takes, if they agree (then the API stores job
        images at that size); None otherwise."""
        specs = {json.dumps(w.get("input"), sort_keys=True) for w in self.ready}
        if len(specs) != 1:
            return None
        return InputSpec.from_dict(self.ready[0].get("input"))

    @cached_property
    def modes(self) -> dict[str, bool]:
        """Text jobs have their own queue, which only text-capable workers consume: one such
        worker is enough."""
        ready = self.ready
        return {
            "image": bool(ready),
            "text": any((w.get("modes") or {}).get("text") for w in ready),
        }


class Fleet:
    def __init__(self, store: AsyncJobStore, *, cache_s: float = CACHE_S) -> None:
        self.store = store
        self.cache_s = cache_s
        self._view: FleetView | None = None
        self._read_at = 0.0

    async def view(self, *, fresh: bool = False) -> FleetView:
        """The workers with a recent heartbeat (Redis errors propagate: a 503)."""
        if fresh or self._view is None or time.monotonic() - self._read_at > self.cache_s:
            workers = await self.store.ready_workers(within_s=HEARTBEAT_WINDOW_S)
            self._view = FleetView(workers)
            self._read_at = time.monotonic()
        return self._view
