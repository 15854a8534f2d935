"""``lookalike index build``: embed a gallery (Fashion-MNIST, or a folder) and save its index,
here or spread over the running workers (``--distributed``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from shared.settings import FASHION_MNIST, FASHION_MNIST_SIZE, GALLERY_NAME, Settings

if TYPE_CHECKING:  # torch is imported when the command runs, not when the parser is built
    from shared.galleries import GallerySource
    from worker.index import Manifest


def cmd_index_build(args: argparse.Namespace, settings: Settings) -> int | str:
    """Build the index; an exit code, or the sentence saying why the flags are wrong."""
    batch_size = args.batch_size or settings.model.batch_size  # None: by the device
    if batch_size is not None and batch_size < 1:
        return "--batch-size must be at least 1"
    target = index_target(args, settings)
    if isinstance(target, str):
        return target
    name, size, directory = target
    if (directory / "manifest.json").exists() and not args.force:
        print(f"index already built at {directory} (use --force to rebuild)")
        return 0
    source = gallery_source(args, settings, name=name, size=size)
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
        manifest = build_here(
            settings, source, directory, batch_size=batch_size, progress=not args.no_progress
        )
    rate = manifest.count / manifest.build_seconds if manifest.build_seconds else 0.0
    print(
        f"index built at {directory}: {manifest.count} images in {manifest.build_seconds:.1f}s "
        f"({rate:.1f} images/s)"
    )
    return 0


def index_target(
    args: argparse.Namespace, settings: Settings
) -> tuple[str, int | None, Path] | str:
    """The gallery's name, size (Fashion-MNIST) and index folder; or why the flags are wrong."""
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
    if not 1 <= size <= FASHION_MNIST_SIZE:
        return f"--size must be from 1 to {FASHION_MNIST_SIZE}"
    return FASHION_MNIST, size, index_dir(root, gallery=FASHION_MNIST, model_id=model, size=size)


def gallery_source(
    args: argparse.Namespace, settings: Settings, *, name: str, size: int | None
) -> GallerySource:
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


def build_here(
    settings: Settings,
    source: GallerySource,
    directory: Path,
    *,
    batch_size: int | None,
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
