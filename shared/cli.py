"""The ``lookalike`` command line: serve, api, worker, index build, query, bench.

Every command reads the same ``LOOKALIKE_*`` settings. Heavy imports (torch, the worker) are
made inside the commands that need them, so ``lookalike api`` and ``lookalike query`` stay light.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import LookalikeError
from shared.settings import Settings, get_settings, load_settings

if TYPE_CHECKING:  # the commands import what they need when they run: `api` stays light
    from shared.galleries import GallerySource
    from worker.index import Manifest

DEFAULT_API_URL = "http://127.0.0.1:8000"


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


def _fail(message: str, code: int = 2) -> int:
    print(f"lookalike: {message}", file=sys.stderr)
    return code


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings()  # refuse bad settings before binding the port
    if not settings.api.keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"lookalike: warning: serving on {args.host} without API keys; anyone who can "
            "reach this port can submit jobs. Set LOOKALIKE_API_KEYS for production.",
            file=sys.stderr,
        )
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        timeout_keep_alive=5,
        log_level="warning",
        access_log=False,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker

    load_settings()
    return run_worker(build_missing=args.build_index, loglevel=args.loglevel)


def cmd_index_build(args: argparse.Namespace) -> int:
    """Embed a gallery (Fashion-MNIST, or a folder with --images) and save its index."""
    settings = load_settings()
    batch_size = args.batch_size or settings.model.batch_size  # None: by the device
    if batch_size is not None and batch_size < 1:
        return _fail("--batch-size must be at least 1")
    target = _index_target(args, settings)
    if isinstance(target, str):
        return _fail(target)
    name, size, directory = target
    if (directory / "manifest.json").exists() and not args.force:
        print(f"index already built at {directory} (use --force to rebuild)")
        return 0
    source = _gallery_source(args, settings, name=name, size=size)
    if args.distributed:
        from worker.distributed import build_index_distributed

        manifest = build_index_distributed(
            settings,
            source,
            directory=directory,
            batch_size=batch_size,
            progress=not args.no_progress,
        )
    else:
        manifest = _build_here(
            settings, source, directory, batch_size, progress=not args.no_progress
        )
    rate = manifest.count / manifest.build_seconds if manifest.build_seconds else 0.0
    print(
        f"index built at {directory}: {manifest.count} images in {manifest.build_seconds:.1f}s "
        f"({rate:.1f} images/s)"
    )
    return 0


def _index_target(
    args: argparse.Namespace, settings: Settings
) -> tuple[str, int | None, Path] | str:
    """The gallery's name, size (Fashion-MNIST) and index folder; or why the flags are wrong."""
    from shared.settings import FASHION_MNIST, GALLERY_NAME
    from worker.index import index_dir

    root, model = settings.gallery.index_dir, settings.model.name
    if args.images:
        name = args.name or Path(args.images).expanduser().resolve().name.lower()
        if GALLERY_NAME.fullmatch(name) is None or name == FASHION_MNIST:
            return (
                f"{name!r} is not a gallery name for a folder: give --name with lower-case "
                "letters, digits, '.', '_' and '-' (and not fashion-mnist)"
            )
        return name, None, index_dir(root, gallery=name, model_id=model)
    if args.name and args.name != FASHION_MNIST:
        return "--name is for a folder gallery: give the folder with --images"
    size = args.size or settings.gallery.size
    if not 1 <= size <= 70_000:
        return "--size must be from 1 to 70000"
    return FASHION_MNIST, size, index_dir(root, gallery=FASHION_MNIST, model_id=model, size=size)


def _gallery_source(args: argparse.Namespace, settings: Any, *, name: str, size: int | None) -> Any:
    """Fashion-MNIST's first ``size`` images, or the folder (checked file by file)."""
    from shared.galleries import FashionMnistSource, FolderSource, scan_folder
    from worker.index import progress_bar

    if not args.images:
        return FashionMnistSource.load(settings.gallery.data_dir, size=size or 0)
    folder = Path(args.images).expanduser()
    max_pixels = settings.storage.max_image_pixels
    bar = progress_bar(total=None, enabled=not args.no_progress, desc="checking files")
    listing = scan_folder(folder, max_pixels=max_pixels, on_file=lambda: bar.update(1))
    bar.close()
    for skipped in listing.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    source = FolderSource(name, listing, max_pixels=max_pixels)
    classes = ", ".join(source.class_names[:8]) + (", ..." if len(source.class_names) > 8 else "")
    print(
        f"{folder}: {len(source)} images in {len(source.class_names)} classes ({classes}); "
        f"{len(listing.skipped)} unreadable skipped, {listing.ignored} other files ignored",
        file=sys.stderr,
    )
    return source


def _build_here(
    settings: Settings,
    source: GallerySource,
    directory: Path,
    batch_size: int | None,
    *,
    progress: bool,
) -> Manifest:
    """Load the model in this process and build the index with it."""
    from worker.encoder import index_batch_size, load_encoder
    from worker.index import build_index

    encoder = load_encoder(settings.model, probe_images=source.images(0, 8))
    batch = index_batch_size(batch_size, encoder.device)
    print(
        f"indexing {len(source)} images of {source.name} with {encoder.model_id} "
        f"on {encoder.device} ({encoder.precision}), batch {batch}",
        file=sys.stderr,
    )
    if encoder.is_random:
        print(
            "warning: random weights: the index is for testing and benchmarks only", file=sys.stderr
        )
    return build_index(encoder, source, directory=directory, batch_size=batch, progress=progress)


def cmd_query(args: argparse.Namespace) -> int:
    """Submit an image (or --text), wait for the answer, print it; --save writes the picture."""
    import httpx

    if (args.image is None) == (args.text is None):
        return _fail("give an IMAGE file or --text, one of them")
    if args.image is not None and not Path(args.image).is_file():
        return _fail(f"{args.image} is not a file")
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
            return _fail(f"{reply.status_code}: {_detail(reply)}")
        job = reply.json()
        while job["status"] not in ("succeeded", "failed"):
            if time.monotonic() > deadline:
                return _fail(f"job {job['id']} did not end within {args.timeout}s")
            reply = client.get(f"/jobs/{job['id']}", params={"wait": "30"})
            if reply.status_code != 200:
                return _fail(f"{reply.status_code}: {_detail(reply)}")
            job = reply.json()
        if args.save and job["status"] == "succeeded":
            picture = client.get(f"/jobs/{job['id']}/grid.png")
            if picture.status_code != 200:
                return _fail(f"the picture: {picture.status_code}: {_detail(picture)}")
            Path(args.save).write_bytes(picture.content)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0 if job["status"] == "succeeded" else 1
    if job["status"] == "failed":
        return _fail(f"job {job['id']} failed: {job['error']}", 1)
    print(format_result(job))
    if args.save:
        print(f"picture saved to {args.save}")
    return 0


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


def _detail(reply: Any) -> str:
    try:
        return str(reply.json().get("detail", reply.text))
    except ValueError:
        return str(reply.text)


def cmd_bench(args: argparse.Namespace) -> int:
    """Load-test a running service over HTTP, or (``--model-only``) time the model here."""
    for name in ("requests", "concurrency", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.timeout <= 0:
        return _fail("--warmup must be 0 or more and --timeout more than 0")
    settings = load_settings()
    if args.model_only:
        from worker.bench import DEFAULT_SIZES, format_model_report, run_model_bench

        try:
            sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else DEFAULT_SIZES
        except ValueError:
            return _fail("--sizes is a comma-separated list of row counts")
        report = run_model_bench(
            settings, batch_size=args.batch_size, repeats=args.repeats, sizes=sizes
        )
        print(format_model_report(report))
        code = 0
    else:
        from shared.bench import bench_service, exit_code, format_summary

        report = bench_service(
            args.url,
            requests=args.requests,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            warmup=args.warmup,
            data_dir=settings.gallery.data_dir,
            api_key=args.api_key,
        )
        print(format_summary(report))
        code = exit_code(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return code


def cmd_eval(args: argparse.Namespace) -> int:
    """Label precision@k of the model on Fashion-MNIST, against a raw-pixel baseline."""
    if not 1 <= args.queries <= 10_000:
        return _fail("--queries must be from 1 to 10000 (Fashion-MNIST's test split)")
    if not 1 <= args.k <= 50:
        return _fail("--k must be from 1 to 50")
    if args.batch_size is not None and args.batch_size < 1:
        return _fail("--batch-size must be at least 1")
    if args.json and not Path(args.json).parent.is_dir():
        return _fail(f"--json: the folder of {args.json} does not exist")
    settings = load_settings()
    size = args.gallery_size
    if size is None:
        size = min(settings.gallery.size, 60_000)
    if not 1 <= size <= 60_000:
        return _fail("--gallery-size must be from 1 to 60000 (Fashion-MNIST's train split)")
    if args.k > size:
        return _fail(f"--k ({args.k}) cannot exceed the gallery size ({size})")
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


def cmd_serve(args: argparse.Namespace) -> int:
    """API + one worker + Redis, on one machine, with nothing but pip packages."""
    from shared.redis_server import start_redis
    from shared.settings import data_home

    load_settings()
    redis_server = None
    if not os.environ.get("LOOKALIKE_REDIS_URL"):
        redis_server = start_redis(data_home() / "redis")
        os.environ["LOOKALIKE_REDIS_URL"] = redis_server.url
        print(
            f"lookalike: Redis on {redis_server.url} (data in {redis_server.directory})",
            file=sys.stderr,
        )
    get_settings.cache_clear()
    worker_cmd = [sys.executable, "-m", "shared.cli", "worker", "--build-index"]
    api_cmd = [
        sys.executable,
        "-m",
        "shared.cli",
        "api",
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    stopping = threading.Event()
    children: dict[str, subprocess.Popen[bytes]] = {}

    def supervise(name: str, command: list[str]) -> None:
        backoff = 1.0
        while not stopping.is_set():
            started = time.monotonic()
            process = subprocess.Popen(command)
            children[name] = process
            code = process.wait()
            if stopping.is_set():
                return
            if code == 2:  # a configuration error: restarting would not help
                print(f"lookalike: the {name} cannot start (see above); stopping", file=sys.stderr)
                stopping.set()
                return
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            print(
                f"lookalike: the {name} exited ({code}); restarting in {backoff:.0f}s",
                file=sys.stderr,
            )
            stopping.wait(backoff)

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    threads = [
        threading.Thread(target=supervise, args=("worker", worker_cmd), daemon=True),
        threading.Thread(target=supervise, args=("api", api_cmd), daemon=True),
    ]
    for thread in threads:
        thread.start()
    print(
        f"lookalike: API on http://{args.host}:{args.port} - the first start builds the index; "
        f"then try: lookalike query PHOTO.jpg",
        file=sys.stderr,
    )
    stopping.wait()
    for process in children.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in children.values():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    if redis_server is not None:
        redis_server.stop()
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
    worker.add_argument("--loglevel", default="INFO")
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
    query.add_argument("--k", type=int, help="how many matches (1..50, default 5)")
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
    evaluate.add_argument("--k", type=int, default=5, help="matches per query, 1..50 (default 5)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return int(args.func(args))
    except LookalikeError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
