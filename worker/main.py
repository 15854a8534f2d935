"""``lookalike worker``: load CLIP and the index, announce readiness, consume jobs."""

from __future__ import annotations

import logging
import sys
import threading

from celery.signals import worker_ready

from shared.celery_config import (
    SEARCH_TASK,
    build_queue,
    job_queue,
    make_celery,
    search_queues,
    text_queue,
)
from shared.errors import LookalikeError
from shared.schemas import JobKind
from shared.settings import Settings
from worker.watchdog import Watchdog

log = logging.getLogger("lookalike.worker")


def run_worker(*, build_missing: bool, loglevel: str = "INFO", only_build: bool = False) -> int:
    import worker.celery_app as celery_app
    from shared.allocator import keep_freed_memory
    from worker.engine import attach_live, get_engine
    from worker.heartbeat import Heartbeat, worker_name

    keep_freed_memory()  # each batch's tensors reuse the last one's memory

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
    if only_build:  # the index is there now; the workers that serve it start next
        heartbeat.stop()
        return 0
    heartbeat.update(state="loading", reason="loading the live galleries")
    stop_following = attach_live(
        engine, celery_app.live_store(), max_pixels=settings.storage.max_image_pixels
    )
    ready = dict(
        state="ready",
        reason=None,
        model=engine.encoder.model_id,
        model_is_random=engine.encoder.is_random,
        gallery=engine.default_gallery,
        size=len(engine.index),
        galleries=engine.summaries(),
        refused_galleries=engine.refused,
        modes=engine.modes,
        device=engine.encoder.device,
        precision=engine.encoder.precision,
        forward=engine.encoder.forward_note,
        preprocessing=engine.encoder.path,
        preprocessing_check=engine.encoder.path_note,
        input=spec.as_dict() if (spec := engine.encoder.input_spec) else None,
        load_seconds=round(engine.load_seconds, 2),
    )
    # Ready once Celery consumes: /readyz must not promise a worker that cannot take jobs yet.
    heartbeat.update(state="starting", reason="connecting to the queue")

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _consuming(**_: object) -> None:
        heartbeat.update(**ready)

    log.info(
        "worker %s loaded: %s on %s (%s), galleries %s, text search %s, loaded in %.1fs",
        name,
        engine.encoder.model_id,
        engine.encoder.device,
        engine.encoder.precision,
        ", ".join(f"{g['name']} ({g['size']})" for g in engine.summaries()),
        "on" if engine.modes["text"] else "off",
        engine.load_seconds,
    )
    if engine.encoder.is_random:
        log.warning(
            "LOOKALIKE_MODEL=%s has random weights: its matches are meaningless",
            engine.encoder.model_id,
        )
    metrics = celery_app.metrics()
    metrics.start()

    def time_out(job_id: str, sentence: str) -> None:
        if celery_app.store().fail(job_id, sentence):
            metrics.inc("lookalike_jobs_finished_total", {"status": "failed", "reason": "timeout"})

    celery_app.watchdog = Watchdog(settings.broker.task_time_limit_s, fail=time_out)
    stop_reconciler = start_reconciler(settings, name=name)
    try:
        worker = celery_app.app.Worker(
            pool="solo",
            concurrency=1,
            loglevel=loglevel,
            hostname=f"lookalike@{name}",
            queues=consumed_queues(settings, text=engine.modes["text"]),
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            optimization="fair",
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        stop_following.set()
        stop_reconciler.set()
        metrics.stop()
        heartbeat.stop()


def consumed_queues(settings: Settings, *, text: bool) -> list[str]:
    """Image jobs, text jobs when text search is on, and distributed index builds."""
    queues = [settings.broker.queue, build_queue(settings)]
    return queues + [text_queue(settings)] if text else queues


def start_reconciler(settings: Settings, *, name: str) -> threading.Event:
    """Run the reconciler in a daemon thread; set the returned event to stop it."""
    import worker.celery_app as celery_app
    from worker.reconciler import Reconciler

    sender = make_celery(settings, name="lookalike-reconciler")

    def enqueue(job_id: str, kind: JobKind) -> None:
        queue = job_queue(settings, kind)
        sender.send_task(SEARCH_TASK, args=[job_id], task_id=job_id, queue=queue)

    reconciler = Reconciler(
        celery_app.store(),
        enqueue,
        queues=search_queues(settings),
        text_queue=text_queue(settings),
        stuck_after_s=settings.broker.stuck_after_s,
        time_limit_s=settings.broker.task_time_limit_s,
        name=name,
    )
    stop = threading.Event()
    interval = max(1.0, min(10.0, settings.broker.stuck_after_s / 2))
    threading.Thread(
        target=reconciler.run_forever,
        kwargs={"interval_s": interval, "stop": stop},
        name="reconciler",
        daemon=True,
    ).start()
    return stop
