"""The ``lookalike`` command line: serve, api, worker, index build, gallery add, query, bench,
eval.

Every command reads the same ``LOOKALIKE_*`` settings. Heavy imports (torch, the worker) are
made inside the commands that need them, so ``lookalike api`` and ``lookalike query`` stay
light. A command answers with an exit code; a sentence instead means its flags were wrong
(printed as ``lookalike: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from lookalike.data import add_data_parser
from shared.errors import LookalikeError
from shared.settings import MAX_K, load_settings

DEFAULT_API_URL = "http://127.0.0.1:8000"
EXIT_USAGE = 2  # also what `lookalike serve` reads as "this part cannot start"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
GALLERY_ADD_HELP = """\
Send images into a live gallery, --concurrency at a time, each added once its job succeeded.

From a FOLDER: every .jpg .jpeg .png .webp .gif .bmp .tif .tiff file under it (any case).
An item's id is its path under FOLDER without the extension, folders joined by '.' and any
character other than letters, digits, '-', '_', '.' and ':' turned into '_':
shoes/red shoe.JPG becomes shoes.red_shoe. No attributes are sent. Files that come to the
same id (a.png and a.jpg): the first in name order is sent, the others are refused.

From --manifest: one JSON object a line,
  {"id": "sku-1", "path": "img/1.jpg", "attributes": {"colour": "red", "price": 30}}
a path relative to the manifest's folder (or absolute); a malformed line is refused.

Run it again to resume: an item already indexed with the same bytes (and, from a manifest,
the same attributes) is skipped. Exit status 0 when every item is there, 1 when some were
refused or failed (listed at the end), 2 when the command cannot start."""


def _setup_logging() -> None:
    """LOOKALIKE_LOG_LEVEL and LOOKALIKE_LOG_FORMAT; a bad value is reported by the command."""
    from pydantic import ValidationError

    from shared.logs import setup_logging
    from shared.settings import LogSettings

    try:
        log_settings = LogSettings()
    except ValidationError:
        log_settings = LogSettings(level="INFO", format="text")
    setup_logging(level=log_settings.level, fmt=log_settings.format)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request of the client


def cmd_api(args: argparse.Namespace) -> int | str:
    import uvicorn

    from api.edge import raise_open_files_limit, uvicorn_limits

    settings = load_settings()  # refuse bad settings before binding the port
    if not settings.api.keys and args.host not in LOOPBACK:
        print(
            f"lookalike: warning: serving on {args.host} without API keys; anyone who can "
            "reach this port can submit jobs. Set LOOKALIKE_API_KEYS for production.",
            file=sys.stderr,
        )
    taken = port_taken(args.host, args.port)
    if taken:
        return taken
    short = raise_open_files_limit(connections=settings.api.max_connections)
    if short:
        print(f"lookalike: warning: {short}", file=sys.stderr)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        access_log=False,
        **uvicorn_limits(settings.api),  # head limits, head deadline, keep-alive, connection cap
    )
    return 0


def port_taken(host: str, port: int) -> str | None:
    """Why the API cannot listen on ``host:port`` (a sentence), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            return f"cannot listen on {host}:{port}: {error.strerror or error}"
    return None


def cmd_worker(args: argparse.Namespace) -> int | str:
    if args.processes < 1:
        return "--processes must be at least 1"
    loglevel = (args.loglevel or load_settings().log.level).upper()
    if args.processes > 1:
        from lookalike.serve import run_workers

        return run_workers(args.processes, build_index=args.build_index, loglevel=loglevel)
    from worker.main import run_worker

    return run_worker(build_missing=args.build_index, loglevel=loglevel, only_build=args.only_build)


def cmd_index_build(args: argparse.Namespace) -> int | str:
    from lookalike.build import cmd_index_build as build

    return build(args, load_settings())


def cmd_gallery_add(args: argparse.Namespace) -> int | str:
    from lookalike.catalogue import cmd_gallery_add as add

    return add(args)


def cmd_query(args: argparse.Namespace) -> int | str:
    from lookalike.query import cmd_query as query

    return query(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from lookalike.serve import cmd_serve as serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int | str:
    """Load-test a running service over HTTP, or (``--model-only``) time the model here."""
    for name in ("requests", "concurrency", "batch_size", "repeats", "processes"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if args.warmup < 0 or args.timeout <= 0 or args.submit_wait < 0:
        return "--warmup and --submit-wait must be 0 or more and --timeout more than 0"
    settings = load_settings()
    if args.model_only:
        from lookalike.bench.model import DEFAULT_SIZES, format_model_report, run_model_bench

        try:
            sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES
        except ValueError:
            return "--sizes is a comma-separated list of row counts"
        report = run_model_bench(
            settings, batch_size=args.batch_size, repeats=args.repeats, sizes=sizes
        )
        print(format_model_report(report))
        code = 0
    else:
        from lookalike.bench.service import bench_service, exit_code, format_summary

        report = bench_service(
            args.url,
            requests=args.requests,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            warmup=args.warmup,
            data_dir=settings.gallery.data_dir,
            api_key=args.api_key,
            processes=args.processes,
            submit_wait_s=args.submit_wait,
        )
        print(format_summary(report))
        code = exit_code(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return code


def cmd_eval(args: argparse.Namespace) -> int | str:
    """Label precision@k of the model on Fashion-MNIST, against a raw-pixel baseline."""
    if not 1 <= args.queries <= 10_000:
        return "--queries must be from 1 to 10000 (Fashion-MNIST's test split)"
    if not 1 <= args.k <= MAX_K:
        return f"--k must be from 1 to {MAX_K}"
    if args.batch_size is not None and args.batch_size < 1:
        return "--batch-size must be at least 1"
    if args.json and not Path(args.json).parent.is_dir():
        return f"--json: the folder of {args.json} does not exist"
    settings = load_settings()
    size = args.gallery_size
    if size is None:
        size = min(settings.gallery.size, 60_000)
    if not 1 <= size <= 60_000:
        return "--gallery-size must be from 1 to 60000 (Fashion-MNIST's train split)"
    if args.k > size:
        return f"--k ({args.k}) cannot exceed the gallery size ({size})"
    from worker.evaluate import format_eval_report, run_eval

    report = run_eval(
        settings,
        queries=args.queries,
        k=args.k,
        gallery_size=size,
        batch_size=args.batch_size or settings.model.batch_size,  # None: by the device
        progress=not args.no_progress,
    )
    print(format_eval_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookalike",
        description="Image-similarity search over a gallery, as a task-queue service.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="API + one worker + Redis on this machine")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    api = commands.add_parser("api", help="the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="a Celery worker holding CLIP and the index")
    worker.add_argument(
        "--build-index", action="store_true", help="build the index first if it is missing"
    )
    worker.add_argument(
        "--loglevel", help="DEBUG, INFO, WARNING or ERROR (default LOOKALIKE_LOG_LEVEL, else INFO)"
    )
    worker.add_argument("--only-build", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument(
        "--processes",
        type=int,
        default=1,
        help="worker processes, each with its own model, sharing this machine's GPU (or CPU); "
        "supervised by this one (default 1)",
    )
    worker.set_defaults(func=cmd_worker)

    index = commands.add_parser("index", help="the gallery index")
    index_commands = index.add_subparsers(dest="index_command", required=True)
    build = index_commands.add_parser("build", help="embed the gallery and save the index")
    build.add_argument(
        "--images", metavar="FOLDER", help="index your own images (labels: sub-folder names)"
    )
    build.add_argument("--name", help="the gallery's name (default: the folder's name)")
    build.add_argument(
        "--size", type=int, help="Fashion-MNIST images (default LOOKALIKE_GALLERY_SIZE)"
    )
    build.add_argument(
        "--distributed",
        action="store_true",
        help="spread the work over the running workers (one task per chunk)",
    )
    build.add_argument("--batch-size", type=int, help="images per forward pass")
    build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=cmd_index_build)

    gallery = commands.add_parser("gallery", help="live galleries")
    gallery_commands = gallery.add_subparsers(dest="gallery_command", required=True)
    add = gallery_commands.add_parser(
        "add",
        help="send a folder of images, or a manifest's items, to a live gallery",
        description=GALLERY_ADD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("name", metavar="NAME", help="the live gallery (made if it does not exist)")
    add.add_argument(
        "folder", metavar="FOLDER", nargs="?", help="every image file under it, sub-folders too"
    )
    add.add_argument("--manifest", metavar="JSONL", help="the items to send, a JSON object a line")
    add.add_argument(
        "--concurrency",
        type=int,
        default=16,
        metavar="N",
        help="items in flight at once (default 16)",
    )
    add.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="seconds one item's add may take (default 300)",
    )
    add.add_argument("--no-progress", action="store_true", help="no progress bar")
    add.add_argument(
        "--api-key",
        default=os.environ.get("LOOKALIKE_API_KEY"),
        help="sent as a Bearer token (default LOOKALIKE_API_KEY)",
    )
    add.add_argument(
        "--url",
        default=os.environ.get("LOOKALIKE_API_URL", DEFAULT_API_URL),
        help="the service (default LOOKALIKE_API_URL, else http://127.0.0.1:8000)",
    )
    add.set_defaults(func=cmd_gallery_add)

    query = commands.add_parser("query", help="submit an image (or --text) and print its matches")
    query.add_argument("image", nargs="?", help="the image file")
    query.add_argument("--text", help="a text query instead of an image")
    query.add_argument("--gallery", help="the gallery to search (default: the server's)")
    query.add_argument("--save", metavar="PNG", help="write the result picture there")
    query.add_argument(
        "--api-key",
        default=os.environ.get("LOOKALIKE_API_KEY"),
        help="sent as a Bearer token (default LOOKALIKE_API_KEY)",
    )
    query.add_argument("--k", type=int, help=f"how many matches (1..{MAX_K}, default 5)")
    query.add_argument("--url", default=os.environ.get("LOOKALIKE_API_URL", DEFAULT_API_URL))
    query.add_argument("--timeout", type=float, default=300.0)
    query.add_argument("--json", action="store_true", help="print the raw job as JSON")
    query.set_defaults(func=cmd_query)

    bench = commands.add_parser(
        "bench", help="load-test a running service, or time the model alone (--model-only)"
    )
    bench.add_argument(
        "--model-only", action="store_true", help="time the encoder and search here, no service"
    )
    bench.add_argument(
        "--url",
        default=os.environ.get("LOOKALIKE_API_URL", DEFAULT_API_URL),
        help="the service (default LOOKALIKE_API_URL, else http://127.0.0.1:8000)",
    )
    bench.add_argument("--requests", type=int, default=100, help="timed requests (default 100)")
    bench.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    bench.add_argument(
        "--timeout", type=float, default=120.0, help="seconds a job may take to end (default 120)"
    )
    bench.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    bench.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes sharing the requests and the concurrency (default 1): one "
        "process drives about a thousand requests a second",
    )
    bench.add_argument(
        "--submit-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait for each job's end in its submission (POST /jobs?wait=, default 30): one "
        "request per job; 0: submit, then long-poll (two requests per job)",
    )
    bench.add_argument(
        "--api-key",
        default=os.environ.get("LOOKALIKE_API_KEY"),
        help="sent as a Bearer token (default LOOKALIKE_API_KEY)",
    )
    bench.add_argument(
        "--batch-size", type=int, default=32, help="--model-only: images per batch (default 32)"
    )
    bench.add_argument(
        "--repeats", type=int, default=10, help="--model-only: timed runs per figure (default 10)"
    )
    bench.add_argument("--sizes", help=argparse.SUPPRESS)  # synthetic gallery sizes, for tests
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    bench.set_defaults(func=cmd_bench)

    evaluate = commands.add_parser(
        "eval", help="precision@k on Fashion-MNIST's test split, against raw pixels"
    )
    evaluate.add_argument(
        "--queries", type=int, default=1000, help="test images to query (default 1000)"
    )
    evaluate.add_argument(
        "--k", type=int, default=5, help=f"matches per query, 1..{MAX_K} (default 5)"
    )
    evaluate.add_argument(
        "--gallery-size",
        type=int,
        help="first train images searched, 1..60000 (default LOOKALIKE_GALLERY_SIZE)",
    )
    evaluate.add_argument(
        "--batch-size", type=int, help="images per forward pass (default LOOKALIKE_BATCH_SIZE)"
    )
    evaluate.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_eval)

    add_data_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        outcome = args.func(args)
    except LookalikeError as error:
        outcome = str(error)
    except KeyboardInterrupt:
        return 130
    if isinstance(outcome, str):
        print(f"lookalike: {outcome}", file=sys.stderr)
        return EXIT_USAGE
    return int(outcome)
