"""Why ``lookalike bench`` has a client of its own: the CPU a load generator spends per job,
httpx against lookalike.bench.http_lite, on the same service and the same jobs.

    .venv/bin/python -m lookalike.bench.clients [--jobs 600] [--concurrency 32]

It starts a stack (Redis, one worker with a tiny random CLIP, the API: lookalike.stack), then
runs the same jobs with each client in turn (a multipart POST /jobs?wait=20, then long polls
until the job ends), and prints this process's CPU time per job for each: on a small machine
that CPU is taken from the service being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from PIL import Image

from lookalike.bench.http_lite import HttpClient, multipart
from lookalike.checkpoint import save_random_clip
from lookalike.stack import Stack, stack_env
from shared.fashion_mnist import DEBIAN_DIR, load_gallery

PNG = "image/png"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(job: Callable[[int], Awaitable[str]], jobs: int, concurrency: int) -> list[str]:
    numbers = iter(range(jobs))
    ended: list[str] = []

    async def user() -> None:
        for n in numbers:
            ended.append(await job(n))

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return ended


async def with_httpx(url: str, images: list[bytes], jobs: int, concurrency: int) -> list[str]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def job(n: int) -> str:
            image = images[n % len(images)]
            reply = await client.post(
                "/jobs", params={"wait": "20"}, files={"file": ("q.png", image, PNG)}
            )
            found = reply.json()
            while found["status"] not in ("succeeded", "failed"):
                found = (await client.get(f"/jobs/{found['id']}", params={"wait": "20"})).json()
            return str(found["status"])

        return await run(job, jobs, concurrency)


async def with_lite(url: str, images: list[bytes], jobs: int, concurrency: int) -> list[str]:
    client = HttpClient(url, limit=concurrency)
    bodies = [multipart("file", "q.png", PNG, image) for image in images]

    async def job(n: int) -> str:
        body, content_type = bodies[n % len(bodies)]
        reply = await client.request("POST", "/jobs?wait=20", body=body, content_type=content_type)
        found = reply.json()
        while found["status"] not in ("succeeded", "failed"):
            polled = await client.request("GET", f"/jobs/{found['id']}?wait=20")
            found = polled.json()
        return str(found["status"])

    return await run(job, jobs, concurrency)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each client, alternating")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lookalike-clients-"))
    model = save_random_clip(work / "clip", shape="tiny")
    data = DEBIAN_DIR  # Debian's dataset-fashion-mnist (scripts/setup.sh installs it)
    stack = Stack(
        env=stack_env(model_dir=model, data_dir=data, workdir=work, gallery_size=200),
        workdir=work,
    )
    stack.env["LOOKALIKE_MAX_QUEUED"] = "100000"
    gallery = load_gallery(data, size=50)
    images = []
    for pixels in gallery.images:
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    built = stack.run_cli("index", "build", "--no-progress")
    if built.returncode != 0:
        raise SystemExit(built.stderr)
    stack.start(workers=1)
    figures: dict[str, list[float]] = {"httpx": [], "http_lite": []}
    try:
        asyncio.run(with_lite(stack.url, images, 50, args.concurrency))  # warm-up
        for _ in range(args.rounds):
            for name, client in (("httpx", with_httpx), ("http_lite", with_lite)):
                cpu, wall = cpu_seconds(), time.perf_counter()
                ended = asyncio.run(client(stack.url, images, args.jobs, args.concurrency))
                spent, wall = cpu_seconds() - cpu, time.perf_counter() - wall
                assert ended.count("succeeded") == args.jobs, ended
                per_job = spent / args.jobs * 1000
                print(
                    f"{name:10} {args.jobs} jobs at concurrency {args.concurrency}: "
                    f"client CPU {per_job:.2f} ms/job, {args.jobs / wall:.0f} jobs/s"
                )
                figures[name].append(per_job)
    finally:
        stack.stop()
    print(json.dumps({name: [round(v, 2) for v in values] for name, values in figures.items()}))


if __name__ == "__main__":
    main()
