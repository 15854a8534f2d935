"""``lookalike worker``: load CLIP and the index, announce readiness, consume jobs."""

from __future__ import annotations

import logging
import sys

from shared.errors import LookalikeError

log = logging.getLogger("lookalike.worker")


def run_worker(*, build_missing: bool, loglevel: str = "INFO") -> int:
    import worker.celery_app as celery_app
    from worker.engine import get_engine
    from worker.heartbeat import Heartbeat, worker_name

    settings = celery_app.settings
    name = worker_name()
    heartbeat = Heartbeat(
        celery_app.redis_client(settings), prefix=settings.storage.key_prefix, name=name
    )
    heartbeat.start()
    reason = "building the index" if build_missing else "loading the model and index"
    heartbeat.update(state="loading", reason=reason, model=settings.model.name)
    try:
        engine = get_engine(settings, build_missing=build_missing)
    except LookalikeError as error:
        heartbeat.fail(str(error))
        print(f"lookalike worker: {error}", file=sys.stderr)
        return 2
    heartbeat.update(
        state="ready",
        reason=None,
        model=engine.encoder.model_id,
        model_is_random=engine.encoder.is_random,
        gallery=engine.gallery,
        size=len(engine.index),
        device=engine.encoder.device,
        precision=engine.encoder.precision,
        load_seconds=round(engine.load_seconds, 2),
    )
    log.info(
        "worker %s ready: %s on %s (%s), %s with %d images, loaded in %.1fs",
        name,
        engine.encoder.model_id,
        engine.encoder.device,
        engine.encoder.precision,
        engine.gallery,
        len(engine.index),
        engine.load_seconds,
    )
    if engine.encoder.is_random:
        log.warning(
            "LOOKALIKE_MODEL=%s has random weights: its matches are meaningless",
            engine.encoder.model_id,
        )
    celery_app.watchdog = celery_app.Watchdog(settings.broker.task_time_limit_s)
    try:
        worker = celery_app.app.Worker(
            pool="solo",
            concurrency=1,
            loglevel=loglevel,
            hostname=f"lookalike@{name}",
            queues=[settings.broker.queue],
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            optimization="fair",
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        heartbeat.stop()
