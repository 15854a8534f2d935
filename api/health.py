"""Watching the service: liveness, readiness (with the modes workers serve) and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import FleetDep, LiveDep, MetricsDep, SettingsDep, StoreDep, api_key
from api.schemas import Health, Readiness, problem_responses
from shared.celery_config import search_queues
from shared.metrics import read_stored, render

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="The API process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problem_responses(503),
    summary="Redis is reachable and at least one worker has its model and index loaded",
)
async def readyz(store: StoreDep, fleet: FleetDep) -> Any:
    try:
        await store.client.ping()
        view = await fleet.view(fresh=True)
    except Exception as error:
        return _not_ready(f"Redis is unreachable ({type(error).__name__}).")
    # A failed worker's record outlives its process for a while, so its reason can be read.
    if not view.ready:
        if view.workers:
            states = "; ".join(
                f"{w.get('name')}: {w.get('reason') or w.get('state')}" for w in view.workers
            )
            return _not_ready(f"No worker is ready yet ({states}).")
        return _not_ready("No worker is running.")
    return Readiness(
        status="ready",
        modes=view.modes,
        galleries=sorted(view.galleries),
        workers=[{k: v for k, v in w.items() if k != "galleries"} for w in view.ready],
    )


def _not_ready(reason: str) -> JSONResponse:
    return JSONResponse({"detail": reason}, status_code=503, headers={"Retry-After": "5"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, **problem_responses(401, 503)},
    summary="Prometheus metrics of the API and every worker",
    dependencies=[Depends(api_key)],
)
async def metrics(
    settings: SettingsDep, store: StoreDep, own: MetricsDep, fleet: FleetDep, live: LiveDep
) -> Response:
    await run_in_threadpool(own.flush)
    stored = read_stored(await store.client.hgetall(own.key))
    queues = {name: await store.queue_length(name) for name in search_queues(settings)}
    pending = int(await store.client.zcard(store.keys.pending))
    view = await fleet.view(fresh=True)
    states: dict[str, int] = {"ready": 0, "loading": 0, "failed": 0}
    for worker in view.workers:
        state = str(worker.get("state"))
        states[state] = states.get(state, 0) + 1
    sizes = {name: int(g.get("size", 0)) for name, g in view.galleries.items()}
    names = [name for name in await live.names() if name not in sizes]
    sizes |= await live.counts(names)
    gauges = [
        *(
            ("lookalike_gallery_items", "Items in a gallery (built or live).", {"gallery": g}, n)
            for g, n in sorted(sizes.items())
        ),
        *(
            ("lookalike_queue_length", "Jobs waiting in a broker queue.", {"queue": q}, float(n))
            for q, n in queues.items()
        ),
        ("lookalike_jobs_unfinished", "Jobs accepted and not yet ended.", {}, float(pending)),
        *(
            ("lookalike_workers", "Workers with a recent heartbeat, by state.", {"state": s}, n)
            for s, n in sorted(states.items())
        ),
    ]
    return Response(render(stored, gauges), media_type="text/plain; version=0.0.4; charset=utf-8")
