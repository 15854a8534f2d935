"""``lookalike query``: submit an image (or a text), wait for the answer, print it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from shared.errors import QueryFailed

FINAL = ("succeeded", "failed")


def cmd_query(args: argparse.Namespace) -> int | str:
    """Submit, long-poll to the end, print the matches; ``--save`` writes the picture."""
    if (args.image is None) == (args.text is None):
        return "give an IMAGE file or --text, one of them"
    if args.image is not None and not Path(args.image).is_file():
        return f"{args.image} is not a file"
    try:
        job = run_query(args)
    except QueryFailed as error:
        return str(error)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0 if job["status"] == "succeeded" else 1
    if job["status"] == "failed":
        print(f"lookalike: job {job['id']} failed: {job['error']}", file=sys.stderr)
        return 1
    print(format_result(job))
    if args.save:
        print(f"picture saved to {args.save}")
    return 0


def run_query(args: argparse.Namespace) -> dict[str, Any]:
    params = {"k": str(args.k)} if args.k else {}
    if args.gallery:
        params["gallery"] = args.gallery
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    deadline = time.monotonic() + args.timeout
    with httpx.Client(base_url=args.url, timeout=60, headers=headers) as client:
        if args.image is not None:
            path = Path(args.image)
            with path.open("rb") as handle:
                reply = client.post("/jobs", files={"file": (path.name, handle)}, params=params)
        else:
            reply = client.post("/jobs", data={"text": args.text}, params=params)
        if reply.status_code != 202:
            raise QueryFailed(f"{reply.status_code}: {detail(reply)}")
        job: dict[str, Any] = reply.json()
        while job["status"] not in FINAL:
            if time.monotonic() > deadline:
                raise QueryFailed(f"job {job['id']} did not end within {args.timeout}s")
            reply = client.get(f"/jobs/{job['id']}", params={"wait": "30"})
            if reply.status_code != 200:
                raise QueryFailed(f"{reply.status_code}: {detail(reply)}")
            job = reply.json()
        if args.save and job["status"] == "succeeded":
            picture = client.get(f"/jobs/{job['id']}/grid.png")
            if picture.status_code != 200:
                raise QueryFailed(f"the picture: {picture.status_code}: {detail(picture)}")
            Path(args.save).write_bytes(picture.content)
    return job


def format_result(job: dict[str, Any]) -> str:
    result = job["result"]
    timings = result["timings"]
    lines = [
        f"{'rank':>4}  {'index':>6}  {'class':<12}  {'score':>7}",
        *(
            f"{m['rank']:>4}  {m['index']:>6}  {m['label_name']:<12}  {m['score']:>7.4f}"
            for m in result["matches"]
        ),
        "",
        f"model {result['model']} on {result['device']}; gallery {result['gallery']['name']} "
        f"({result['gallery']['size']} images)",
        f"queue {timings['queue_wait_ms']:.1f} ms, embed {timings['embed_ms']:.1f} ms, "
        f"search {timings['search_ms']:.1f} ms, total {timings['total_ms']:.1f} ms",
    ]
    if result["model_is_random"]:
        lines.append("warning: the model has random weights: these matches are meaningless")
    return "\n".join(lines)


def detail(reply: httpx.Response) -> str:
    """The ``detail`` sentence of an error reply, or its text."""
    try:
        return str(reply.json().get("detail", reply.text))
    except ValueError:
        return str(reply.text)
