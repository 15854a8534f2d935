"""The CLIP image encoder: loading (once, slow) is split from embedding (often, fast).

Only the vision tower and its projection are loaded (``CLIPVisionModelWithProjection``), from
a hub id or a local directory through ``from_pretrained``. ``random:vit-b-32`` is an explicit
opt-in that builds a randomly initialised tower of ViT-B/32's exact shape, for offline runs and
benchmarks: its matches are meaningless, and every result says so.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as hf_logging

from shared.errors import ModelLoadError
from shared.images import InputSpec
from shared.schemas import Embeddings
from shared.settings import RANDOM_MODEL_PREFIX, ModelSettings
from worker import graphs, int8
from worker.graphs import GraphedForward
from worker.preprocess import (
    PIL_TORCH,
    PROCESSOR,
    TORCH,
    Picture,
    Preprocessing,
    as_array,
    as_image,
    tensor_input,
)

try:  # transformers 5: the PIL implementation needs no torchvision
    from transformers import CLIPImageProcessorPil as _PilProcessor
except ImportError:  # pragma: no cover - transformers 4
    from transformers import CLIPImageProcessor as _PilProcessor

ImageProcessor: Any = _PilProcessor
"""CLIP's own image processor (its PIL implementation): the reference preprocessing."""

log = logging.getLogger(__name__)

# CLIPVisionConfig's defaults are ViT-B/32's shape. The wider initialisation spreads random
# embeddings apart (the default maps every image to nearly one point); compute is unchanged.
RANDOM_SHAPES: dict[str, dict[str, Any]] = {"vit-b-32": {"initializer_factor": 5.0}}
RANDOM_SEED = 0
CONVERSION = "lookalike-rgb-v1"  # shared.images.to_rgb; bump when it changes
EQUIVALENCE_MIN_COSINE = 0.99
FAST_MIN_COSINE = 0.995
PREPROCESS_MIN_COSINE = 0.999
# int8 on CPU is fastest in forward passes of a few images: its activations then stay in
# cache (on the 2-core development machine: 64 img/s alone, 100 img/s by 8, 55 img/s by 32;
# `lookalike bench --model-only` prints it). Larger batches are cut into passes of this size.
INT8_FORWARD = 8
# ``auto`` keeps a faster CPU path only if it is: int8's quantising costs more than it saves
# in a narrow model (the tiny test CLIP: x0.54 of fp32 on a VNNI CPU).
MIN_FAST_GAIN = 1.1
# torch's fused scaled-dot-product attention: the fastest the model has on a GPU (24,567 against
# 19,690 images/s eager for ViT-B/32 at batch 256 on an H100), the same results.
ATTENTION = "sdpa"
CPU_INDEX_BATCH = 32
GPU_INDEX_BATCH = 256


def resolve_device(requested: str, *, cuda_available: bool, mps_available: bool = False) -> str:
    """``auto`` means cuda when there is one, then mps, else cpu; anything else as asked."""
    if requested != "auto":
        if requested.startswith("cuda") and not cuda_available:
            raise ModelLoadError(
                f"LOOKALIKE_DEVICE={requested} but no CUDA device is visible to torch"
            )
        return requested
    if cuda_available:
        return "cuda"
    if mps_available:
        return "mps"
    return "cpu"


def index_batch_size(configured: int | None, device: str) -> int:
    """Images per batch of an index build: as configured, else large on a GPU."""
    return configured or (GPU_INDEX_BATCH if device.startswith("cuda") else CPU_INDEX_BATCH)


def accelerator_dtype(device: str) -> torch.dtype:
    """fp16 on GPUs (twice the speed, same rankings), fp32 elsewhere."""
    return torch.float16 if device.startswith("cuda") else torch.float32


@dataclass
class ClipImageEncoder:
    """CLIP's image tower. A batch larger than ``max_forward`` (when set) is embedded in
    forward passes of at most that many images."""

    model_id: str
    model: torch.nn.Module
    processor: Any
    device: str
    dtype: torch.dtype
    precision: str
    is_random: bool
    notes: list[str] = field(default_factory=list)
    max_forward: int | None = None
    steps: Preprocessing | None = None
    path: str = PROCESSOR  # how images become pixels (worker.preprocess), once checked
    path_note: str = ""  # why that path: its check against the processor
    graphed: GraphedForward | None = None  # small batches replayed from CUDA graphs
    forward_note: str = "eager"  # how the forward pass runs, and why

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = Preprocessing.of(self.processor)

    @property
    def input_spec(self) -> InputSpec | None:
        """What the processor makes of an image before normalising it (announced to the API,
        which stores job images at this size)."""
        return self.steps.spec if self.steps is not None else None

    @property
    def dim(self) -> int:
        config: Any = self.model.config
        return int(config.projection_dim)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What turns an image into pixels: part of an index's identity."""
        config = self.processor.to_dict()
        keep = (
            "size",
            "crop_size",
            "resample",
            "image_mean",
            "image_std",
            "rescale_factor",
            "do_resize",
            "do_center_crop",
            "do_normalize",
            "do_rescale",
            "do_convert_rgb",
        )
        return {"conversion": CONVERSION, **{k: config.get(k) for k in keep}}

    @property
    def preprocessing_digest(self) -> str:
        text = json.dumps(self.preprocessing, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess RGB images exactly as CLIP's image processor does."""
        batch = self.processor(images=list(images), return_tensors="pt")
        pixels: torch.Tensor = batch["pixel_values"]
        return pixels

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> Embeddings:
        """Forward passes (one, or one per ``max_forward`` images); L2-normalised float32 rows."""
        step = self.max_forward or int(pixel_values.shape[0]) or 1
        x = pixel_values.to(self.device, dtype=self.dtype, non_blocking=True)
        forward = self.graphed or self.eager
        parts = [forward(x[i : i + step]) for i in range(0, len(x), step)]
        features = (parts[0] if len(parts) == 1 else torch.cat(parts)).float()
        features = torch.nn.functional.normalize(features, dim=-1)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)

    def eager(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The model's image embeddings, unnormalised (one forward pass, no graph)."""
        embeds: torch.Tensor = self.model(pixel_values=pixel_values).image_embeds
        return embeds

    def input_pixels(self, images: Sequence[Picture], *, path: str | None = None) -> torch.Tensor:
        """The model's input for RGB images (or their pixels), by ``path`` (the checked one by
        default)."""
        path = path or self.path
        if path == PROCESSOR or self.steps is None:
            return self.pixels([as_image(image) for image in images])
        if path == PIL_TORCH:
            arrays = [self.steps.prepare(as_image(image)) for image in images]
            return tensor_input(self.steps, arrays, device=self.device, on_device=False)
        arrays = [as_array(image) for image in images]
        return tensor_input(self.steps, arrays, device=self.device, on_device=True)

    def embed_arrays(
        self, arrays: Sequence[npt.NDArray[np.uint8]], *, prepared: bool
    ) -> Embeddings:
        """Embed HxWx3 uint8 arrays: already resized and cropped (``prepared``, by
        :meth:`Preprocessing.prepare` in a loader process), or raw (resized here, on the
        device). For the fast paths only; an encoder on the processor path takes images."""
        assert self.steps is not None and self.path != PROCESSOR
        pixels = tensor_input(self.steps, arrays, device=self.device, on_device=not prepared)
        return self.embed_pixels(pixels)

    def embed(self, images: Sequence[Picture]) -> Embeddings:
        return self.embed_pixels(self.input_pixels(images))


def _load_processor(name: str) -> Any:
    if name.startswith(RANDOM_MODEL_PREFIX):
        return ImageProcessor()  # its defaults are OpenAI CLIP's preprocessing
    return ImageProcessor.from_pretrained(name)


def _load_model(name: str) -> torch.nn.Module:
    if name.startswith(RANDOM_MODEL_PREFIX):
        shape = name.removeprefix(RANDOM_MODEL_PREFIX)
        if shape not in RANDOM_SHAPES:
            known = ", ".join(RANDOM_MODEL_PREFIX + s for s in RANDOM_SHAPES)
            raise ModelLoadError(f"LOOKALIKE_MODEL={name} is unknown: random models are {known}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # every process builds the same weights
            config = CLIPVisionConfig(**RANDOM_SHAPES[shape])
            config._attn_implementation = ATTENTION
            model: torch.nn.Module = CLIPVisionModelWithProjection(config)
            return model
    # The vision tower alone is loaded (its text weights are skipped, on purpose).
    vision_config = tower_config(name, "vision")
    if vision_config is None:
        found = type(AutoConfig.from_pretrained(name)).__name__
        raise ModelLoadError(f"LOOKALIKE_MODEL={name} is a {found}, not a CLIP checkpoint")
    try:
        loaded: torch.nn.Module = CLIPVisionModelWithProjection.from_pretrained(
            name, config=vision_config, attn_implementation=ATTENTION
        )
    except (ValueError, ImportError):  # a torch or model without SDPA: transformers' default
        loaded = CLIPVisionModelWithProjection.from_pretrained(name, config=vision_config)
    return loaded


def tower_config(name: str, tower: str) -> Any:
    """The config of one tower (``vision`` or ``text``) of the checkpoint ``name``, or None.

    A full CLIP checkpoint (as on the hub) keeps the projection size at the top level: it is
    copied into the tower's config. A checkpoint of that tower alone is its own config.
    """
    config = AutoConfig.from_pretrained(name)
    if isinstance(config, CLIPConfig):
        sub = config.vision_config if tower == "vision" else config.text_config
        sub.projection_dim = config.projection_dim
        return sub
    alone = CLIPVisionConfig if tower == "vision" else CLIPTextConfig
    return config if isinstance(config, alone) else None


def load_encoder(
    settings: ModelSettings,
    *,
    probe_images: Sequence[Image.Image] = (),
    probe_pixels: torch.Tensor | None = None,
    preprocess_probes: Sequence[Image.Image] = (),
) -> ClipImageEncoder:
    """Load CLIP's image tower once; raise :class:`ModelLoadError` naming LOOKALIKE_MODEL.

    On CPU, a faster path replaces fp32 only if its embeddings of the probes (gallery images,
    or the stored probe pixels of the indexes it will serve) keep cosine >= 0.995 with fp32's:
    int8 linear layers (worker.int8: activations quantised per token, so an embedding never
    depends on its batch), else bf16 where the CPU supports it.
    """
    name = settings.name
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the skipped text weights are not news
            hf_logging.disable_progress_bar()
            try:
                processor = _load_processor(name)
                model = _load_model(name)
            finally:
                hf_logging.set_verbosity(verbosity)
                hf_logging.enable_progress_bar()
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"Could not load the CLIP model {name!r}: {first_line(error)}. Set LOOKALIKE_MODEL "
            "to a hub id this machine can download or to a local directory saved with "
            "save_pretrained (LOOKALIKE_MODEL=random:vit-b-32 runs offline, with random "
            "weights and meaningless matches)."
        ) from error
    device = resolve_device(
        settings.device,
        cuda_available=torch.cuda.is_available(),
        mps_available=bool(
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        ),
    )
    dtype = accelerator_dtype(device)
    model = model.eval().to(device=device, dtype=dtype)
    encoder = ClipImageEncoder(
        model_id=name,
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        precision="fp16" if dtype == torch.float16 else "fp32",
        is_random=name.startswith(RANDOM_MODEL_PREFIX),
    )
    # The preprocessing is checked on the model as loaded (fp32 on a CPU): a faster path of
    # the model itself (int8) would add its own noise to the comparison.
    choose_preprocessing(
        encoder, [*probe_images, *preprocess_probes, *_synthetic_probes()], mode=settings.preprocess
    )
    if device.startswith("cuda") and settings.cuda_graphs == "auto":
        graph_probes = encoder.input_pixels([*probe_images, *_synthetic_probes()])
        encoder.graphed, encoder.forward_note = graphs.capture(
            encoder.eager, graph_probes.to(device, dtype=dtype)
        )
        (log.info if encoder.graphed else log.warning)(encoder.forward_note)
    if device == "cpu" and settings.fast_cpu != "off":
        probes = [encoder.pixels(probe_images)] if probe_images else []
        probes += [probe_pixels] if probe_pixels is not None else []
        pixels = torch.cat(probes) if probes else encoder.pixels(_synthetic_probes())
        choose_cpu_paths(encoder, pixels, mode=settings.fast_cpu)
    log.info(
        "loaded %s on %s (%s) in %.1fs",
        name,
        device,
        encoder.precision,
        time.perf_counter() - started,
    )
    return encoder


def bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (else bf16 is emulated, and slow)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _bf16(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def _extremes(encoder: ClipImageEncoder) -> torch.Tensor:
    """Model inputs of uploads unlike any gallery image (black, white, noise, stripes): the
    strangers a probe may share a forward pass with in a worker's batch."""
    side = 64
    noise = np.random.default_rng(1).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    stripes = np.zeros((side, side, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    images = [
        Image.new("RGB", (side, side), (0, 0, 0)),
        Image.new("RGB", (side, side), (255, 255, 255)),
        Image.fromarray(noise),
        Image.fromarray(stripes),
    ]
    return encoder.input_pixels(images)


def _trial(
    encoder: ClipImageEncoder,
    model: torch.nn.Module,
    dtype: torch.dtype,
    *,
    max_forward: int | None = None,
) -> ClipImageEncoder:
    """``encoder`` with another model, for the start checks before it replaces fp32."""
    return dataclasses.replace(
        encoder, model=model, dtype=dtype, max_forward=max_forward, notes=[], graphed=None
    )


def _worst_cosine(
    encoder: ClipImageEncoder,
    trial: ClipImageEncoder,
    pixels: torch.Tensor,
    reference: Embeddings,
) -> float:
    """The worst cosine with fp32 of the probes embedded by ``trial`` together (in one pass),
    one by one, and each in a pass with strangers (a path that scaled activations per pass
    would make an image's embedding depend on what else is in its batch: a search must not)."""
    batched = trial.embed_pixels(pixels)
    alone = np.concatenate([trial.embed_pixels(pixels[i : i + 1]) for i in range(len(pixels))])
    strangers = _extremes(encoder).to(pixels.device, pixels.dtype)
    mixed = np.concatenate(
        [
            trial.embed_pixels(torch.cat([pixels[i : i + 1], strangers]))[:1]
            for i in range(len(pixels))
        ]
    )
    return float(
        min(np.min(np.sum(reference * found, axis=1)) for found in (batched, alone, mixed))
    )


def _gain(encoder: ClipImageEncoder, trial: ClipImageEncoder, pixels: torch.Tensor) -> float:
    """How many times faster ``trial`` embeds the probes than fp32 ``encoder`` (best of three
    passes each, alternating, after the checks' passes warmed both up)."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(3):
        for side, candidate in enumerate((encoder, trial)):
            started = time.perf_counter()
            candidate.embed_pixels(pixels)
            times[side].append(time.perf_counter() - started)
    return min(times[0]) / max(min(times[1]), 1e-9)


def choose_cpu_paths(encoder: ClipImageEncoder, pixels: torch.Tensor, *, mode: str) -> None:
    """Replace fp32 by a faster CPU path that keeps the embeddings (checked here, on the
    probes, against fp32): int8 (worker.int8) in passes of ``INT8_FORWARD`` images
    (``auto`` where this CPU multiplies int8 fast, ``int8``), else bf16 where the CPU has it
    (``auto``, ``bf16``). A path whose worst cosine is below ``FAST_MIN_COSINE`` (a margin
    over the 0.99 promised for every image) is refused; under ``auto``, so is one that does
    not embed the probes at least ``MIN_FAST_GAIN`` times as fast as fp32."""
    fp32 = encoder.model
    reference = encoder.embed_pixels(pixels)
    order = {"auto": ["int8", "bf16"], "int8": ["int8"], "bf16": ["bf16"]}[mode]
    for name in order:
        if name == "bf16" and not bf16_supported():
            encoder.notes.append("bf16 skipped: this CPU has no native bf16")
            continue
        if name == "int8" and mode == "auto":
            speedup = int8.matmul_speedup()
            if speedup < int8.MIN_SPEEDUP:
                encoder.notes.append(
                    f"int8 skipped: this CPU multiplies int8 matrices x{speedup:.2f} as fast as "
                    "fp32 (no VNNI instructions)"
                )
                continue
        model, dtype = (
            (int8.quantise(fp32), torch.float32)
            if name == "int8"
            else (_bf16(fp32), torch.bfloat16)
        )
        passes = INT8_FORWARD if name == "int8" else None
        worst = _worst_cosine(encoder, _trial(encoder, model, dtype), pixels, reference)
        kept = worst >= FAST_MIN_COSINE
        why = f"min cosine {worst:.4f} vs fp32 on {len(pixels)} probes"
        if kept and mode == "auto":
            gain = _gain(encoder, _trial(encoder, model, dtype, max_forward=passes), pixels)
            kept = gain >= MIN_FAST_GAIN
            why += f", x{gain:.2f} as fast"
        encoder.notes.append(f"{name} {'kept' if kept else 'refused'}: {why}")
        if kept:
            encoder.model, encoder.dtype = model, dtype
            encoder.precision = "int8-dynamic" if name == "int8" else "bf16"
            encoder.max_forward = passes
            break
    for note in encoder.notes:
        log.info(note)


# Sizes the preprocessing check must cover besides the galleries' own images: smaller than the
# model's input (enlarged), about its size, photos (reduced), wide and tall (cropped).
SYNTHETIC_SIZES = ((96, 96), (28, 28), (224, 224), (640, 480), (300, 900), (1000, 250))


def _synthetic_probes(count: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    probes = []
    for number in range(count):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        size = SYNTHETIC_SIZES[number % len(SYNTHETIC_SIZES)]
        probes.append(Image.fromarray(base).resize(size, Image.Resampling.BICUBIC))
    return probes


def choose_preprocessing(
    encoder: ClipImageEncoder, probes: Sequence[Image.Image], *, mode: str
) -> None:
    """Use the faster preprocessing path (``mode``, or ``torch`` for ``auto``) only
    if its embeddings of the probes agree with the processor's to cosine >=
    ``PREPROCESS_MIN_COSINE``; else keep the processor and say why (``path_note``, which the
    worker announces in /readyz, and the log)."""
    path = TORCH if mode == "auto" else mode
    if path == PROCESSOR:
        encoder.path = PROCESSOR
        encoder.path_note = "preprocessing: the image processor (LOOKALIKE_PREPROCESS)"
        return
    if encoder.steps is None:
        encoder.path = PROCESSOR
        encoder.path_note = (
            "preprocessing: the image processor (its steps are not CLIP's resize, crop and "
            "normalise)"
        )
        log.warning(encoder.path_note)
        return
    reference = encoder.embed_pixels(encoder.pixels(probes))
    candidate = encoder.embed_pixels(encoder.input_pixels(probes, path=path))
    worst = float(np.min(np.sum(reference * candidate, axis=1)))
    if worst >= PREPROCESS_MIN_COSINE:
        encoder.path = path
        encoder.path_note = (
            f"preprocessing: {path}, min cosine {worst:.5f} with the image processor on "
            f"{len(probes)} probes"
        )
        log.info(encoder.path_note)
        return
    encoder.path = PROCESSOR
    encoder.path_note = (
        f"preprocessing: the image processor ({path} refused: min cosine {worst:.5f} < "
        f"{PREPROCESS_MIN_COSINE} on {len(probes)} probes)"
    )
    log.warning(encoder.path_note)


def first_line(error: BaseException) -> str:
    """The first line of an error's message, for a one-sentence refusal."""
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__
