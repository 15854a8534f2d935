"""The fast preprocessing paths against CLIP's own image processor (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.images import InputSpec, decode_pixels, model_input, upload_pixels
from shared.settings import ModelSettings
from worker.encoder import (
    PREPROCESS_MIN_COSINE,
    ClipImageEncoder,
    ImageProcessor,
    choose_preprocessing,
    load_encoder,
)
from worker.preprocess import (
    PIL_TORCH,
    PROCESSOR,
    TORCH,
    Preprocessing,
    _resize_float,
    tensor_input,
)

SIZES = [(28, 28), (224, 224), (225, 224), (320, 240), (240, 320), (1000, 223), (3, 5), (641, 479)]


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(1, height // 8), max(1, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def processor() -> object:
    return ImageProcessor()


@pytest.fixture(scope="module")
def steps(processor: object) -> Preprocessing:
    found = Preprocessing.of(processor)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def encoder(tiny_clip_dir: Path) -> ClipImageEncoder:
    return load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))


def test_the_steps_of_clips_processor_are_read_from_its_configuration(
    steps: Preprocessing,
) -> None:
    assert steps.spec == InputSpec(shortest_edge=224, crop_height=224, crop_width=224, resample=3)
    assert steps.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert steps.rescale == pytest.approx(1 / 255)


def test_a_processor_that_pads_or_skips_a_step_has_no_fast_path() -> None:
    assert Preprocessing.of(ImageProcessor(do_center_crop=False)) is None
    assert Preprocessing.of(ImageProcessor(size={"height": 224, "width": 224})) is None


@pytest.mark.parametrize("size", SIZES)
def test_model_input_resizes_and_crops_exactly_as_the_processor(
    processor: object, size: tuple[int, int]
) -> None:
    image = picture(*size)
    reference = processor(  # type: ignore[operator]
        images=[image], do_rescale=False, do_normalize=False, return_tensors="np"
    )["pixel_values"][0]
    ours = np.asarray(model_input(image, InputSpec(224, 224, 224, 3))).transpose(2, 0, 1)
    assert ours.shape == reference.shape
    assert np.array_equal(ours, reference.astype(np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_pil_torch_pixels_are_the_processors(
    encoder: ClipImageEncoder, size: tuple[int, int]
) -> None:
    image = picture(*size, seed=1)
    reference = encoder.pixels([image])
    ours = encoder.input_pixels([image], path=PIL_TORCH)
    assert float((reference - ours).abs().max()) < 1e-5


@pytest.fixture(scope="module")
def b32() -> ClipImageEncoder:
    """ViT-B/32's shape: the tiny test CLIP's weights are wide enough (initializer factor 5)
    to swing on a grey level, far more than a trained model does."""
    return load_encoder(ModelSettings(name="random:vit-b-32", device="cpu", fast_cpu="off"))


@pytest.mark.parametrize("size", SIZES)
def test_torch_resizes_on_a_cpu_as_pillow_does_to_a_grey_level_or_two(
    steps: Preprocessing, size: tuple[int, int]
) -> None:
    image = picture(*size, seed=6)
    batch = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    ours = steps.resize_and_crop(batch)[0].permute(1, 2, 0).numpy().astype(int)
    pillow = np.asarray(model_input(image, steps.spec)).astype(int)
    assert ours.shape == pillow.shape
    assert np.abs(ours - pillow).max() <= 2
    assert np.abs(ours - pillow).mean() < 0.01


@pytest.mark.parametrize("size", [(28, 28), (320, 240), (400, 300), (1000, 223)])
def test_the_gpus_float_resize_is_pillows_to_a_grey_level_or_two(size: tuple[int, int]) -> None:
    """The path a GPU takes, run here on the CPU's tensors."""
    image = picture(*size, seed=7)
    batch = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    target = (224, 298) if size == (400, 300) else (224, 224 * size[0] // size[1])
    ours = _resize_float(batch, target, mode="bicubic")[0].permute(1, 2, 0).numpy().astype(int)
    pillow = np.asarray(image.resize(target[::-1], Image.Resampling.BICUBIC)).astype(int)
    assert ours.dtype == pillow.dtype and ours.shape == pillow.shape
    assert np.abs(ours - pillow).max() <= 2
    assert np.abs(ours - pillow).mean() < 0.5


def test_torch_pixels_are_close_and_embeddings_agree(b32: ClipImageEncoder) -> None:
    images = [picture(*size, seed=2) for size in SIZES]
    reference = b32.pixels(images)
    ours = b32.input_pixels(images, path=TORCH)
    # torch's uint8 bicubic and Pillow's differ by a grey level here and there
    assert float((reference - ours).abs().mean()) < 0.001
    a = b32.embed_pixels(reference)
    b = b32.embed_pixels(ours)
    assert float(np.min(np.sum(a * b, axis=1))) >= PREPROCESS_MIN_COSINE


def test_mixed_sizes_come_back_in_their_order(steps: Preprocessing) -> None:
    arrays = [np.asarray(picture(*size, seed=i)) for i, size in enumerate(SIZES)]
    together = tensor_input(steps, arrays, device="cpu", on_device=True)
    alone = [tensor_input(steps, [a], device="cpu", on_device=True)[0] for a in arrays]
    assert together.shape == (len(SIZES), 3, 224, 224)
    for row, expected in zip(together, alone, strict=True):
        assert torch.equal(row, expected)


def test_the_fast_path_is_kept_when_it_agrees_with_the_processor(
    encoder: ClipImageEncoder,
) -> None:
    probes = [picture(*size, seed=3) for size in SIZES]
    choose_preprocessing(encoder, probes, mode="auto")
    assert encoder.path == TORCH  # the default, on a CPU too
    assert encoder.path_note.startswith("preprocessing: torch, min cosine ")
    assert float(encoder.path_note.split("min cosine ")[1].split()[0]) >= 0.9999


def test_a_fast_path_that_moves_the_embeddings_is_refused_and_says_so(
    encoder: ClipImageEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Preprocessing, "normalise", lambda self, batch: batch.float() / 9.0)
    probes = [picture(*size, seed=4) for size in SIZES]
    choose_preprocessing(encoder, probes, mode="torch")
    assert encoder.path == PROCESSOR
    assert encoder.path_note.startswith("preprocessing: the image processor (torch refused")


def test_the_processor_can_be_asked_for(encoder: ClipImageEncoder) -> None:
    choose_preprocessing(encoder, [picture(28, 28)], mode="processor")
    assert encoder.path == PROCESSOR


def test_a_worker_announces_its_path_and_input_size(tiny_clip_dir: Path) -> None:
    loaded = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu"))
    assert loaded.path == TORCH
    assert loaded.input_spec == InputSpec(224, 224, 224, 3)


@pytest.mark.parametrize("size", SIZES)
def test_the_api_keeps_what_the_model_takes_and_the_worker_embeds_it_like_the_original(
    encoder: ClipImageEncoder, size: tuple[int, int]
) -> None:
    """Upload -> stored pixels (API, with the workers' input size) -> embedding (worker): the
    same as the processor on the decoded upload."""
    import io

    image = picture(*size, seed=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    spec = encoder.input_spec
    assert spec is not None
    kept = decode_pixels(upload_pixels(buffer.getvalue(), max_pixels=10**8, spec=spec))
    if size[0] * size[1] > (2 * spec.shortest_edge) ** 2:
        assert kept.size == (spec.crop_width, spec.crop_height)  # resized by the API
    else:
        assert kept.size == size  # kept as it is, resized by the worker
    a = encoder.embed_pixels(encoder.pixels([image]))
    # Pillow's own pixels; torch's to a grey level (the tiny test CLIP magnifies that)
    for path, least in ((PIL_TORCH, 0.99999), (TORCH, PREPROCESS_MIN_COSINE)):
        b = encoder.embed_pixels(encoder.input_pixels([kept], path=path))
        assert float(np.sum(a * b)) >= least
