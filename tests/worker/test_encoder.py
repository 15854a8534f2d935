"""The CLIP encoder: device choice, loading, and what its embeddings promise."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import worker.encoder as encoder_module
from shared.errors import ModelLoadError
from shared.settings import ModelSettings
from worker import int8
from worker.encoder import ClipImageEncoder, accelerator_dtype, load_encoder, resolve_device

TINY_DIM = 32
NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def pictures(count: int, *, seed: int = 1) -> list[Image.Image]:
    """Blocky RGB pictures, different enough from each other for a random CLIP."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(count, 7, 7, 3), dtype=np.uint8)
    return [Image.fromarray(np.kron(c, np.ones((8, 8, 1), dtype=np.uint8))) for c in coarse]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.fixture(scope="module")
def fp32_encoder(tiny_clip_dir: Path) -> ClipImageEncoder:
    return load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="off"))


@pytest.fixture(scope="module")
def random_encoder() -> ClipImageEncoder:
    return load_encoder(ModelSettings(name="random:vit-b-32", device="cpu", fast_cpu="off"))


# --- device and dtype: the GPU path, decided without a GPU --------------------------------------


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, False, "cuda"), (True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_resolve_device_auto_prefers_cuda_then_mps_then_cpu(
    cuda: bool, mps: bool, expected: str
) -> None:
    assert resolve_device("auto", cuda_available=cuda, mps_available=mps) == expected


@pytest.mark.parametrize(
    ("requested", "cuda"), [("cpu", True), ("cuda", True), ("cuda:1", True), ("mps", False)]
)
def test_resolve_device_keeps_explicit_device(requested: str, cuda: bool) -> None:
    assert resolve_device(requested, cuda_available=cuda, mps_available=True) == requested


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_resolve_device_refuses_cuda_without_cuda(requested: str) -> None:
    with pytest.raises(ModelLoadError, match="LOOKALIKE_DEVICE"):
        resolve_device(requested, cuda_available=False)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cuda", torch.float16),
        ("cuda:1", torch.float16),
        ("cpu", torch.float32),
        ("mps", torch.float32),
    ],
)
def test_accelerator_dtype_is_fp16_on_cuda_only(device: str, dtype: torch.dtype) -> None:
    assert accelerator_dtype(device) == dtype


@NEEDS_NO_CUDA
def test_load_encoder_refuses_cuda_device_without_cuda(tiny_clip_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="LOOKALIKE_DEVICE=cuda"):
        load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cuda"))


@NEEDS_CUDA
def test_load_encoder_on_cuda_runs_fp16_with_fp32_rankings(
    tiny_clip_dir: Path, fp32_encoder: ClipImageEncoder
) -> None:
    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="auto"))
    images = pictures(4)

    embeddings = encoder.embed(images)

    assert encoder.device.startswith("cuda")
    assert (encoder.dtype, encoder.precision) == (torch.float16, "fp16")
    assert embeddings.dtype == np.float32
    assert np.min(cosines(embeddings, fp32_encoder.embed(images))) >= 0.99
    # small batches replay CUDA graphs (worker.graphs), equal to the eager pass
    assert encoder.graphed is not None, encoder.forward_note
    eager = dataclasses.replace(encoder, graphed=None)
    assert np.min(cosines(embeddings, eager.embed(images))) >= 0.999
    assert np.min(cosines(encoder.embed(images[:1]), eager.embed(images[:1]))) >= 0.999


# --- loading the tiny checkpoint ----------------------------------------------------------------


def test_tiny_encoder_gives_normalised_float32_rows(fp32_encoder: ClipImageEncoder) -> None:
    embeddings = fp32_encoder.embed(pictures(3))

    assert fp32_encoder.dim == TINY_DIM
    assert embeddings.shape == (3, TINY_DIM)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert fp32_encoder.is_random is False


def test_fast_cpu_off_keeps_fp32(fp32_encoder: ClipImageEncoder) -> None:
    assert (fp32_encoder.device, fp32_encoder.precision) == ("cpu", "fp32")
    assert fp32_encoder.dtype == torch.float32
    assert fp32_encoder.notes == []


@pytest.mark.parametrize("fast_cpu", ["off", "auto"])
def test_image_alone_matches_itself_in_a_batch(tiny_clip_dir: Path, fast_cpu: str) -> None:
    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu=fast_cpu))
    images = pictures(6)

    batched = encoder.embed(images)
    alone = np.concatenate([encoder.embed([image]) for image in images])

    assert np.min(cosines(alone, batched)) >= 0.99


def test_fast_cpu_auto_uses_int8_only_when_embeddings_agree(
    tiny_clip_dir: Path, fp32_encoder: ClipImageEncoder
) -> None:
    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="auto"))
    images = pictures(8, seed=5)
    reference = fp32_encoder.embed(images)

    assert encoder.notes[0].startswith(("int8 kept", "int8 refused", "int8 skipped"))
    if encoder.precision.startswith("int8-dynamic"):
        assert encoder.notes[0].startswith("int8 kept")
    elif encoder.precision == "fp32":
        assert all(" refused" in note or " skipped" in note for note in encoder.notes)
        np.testing.assert_allclose(encoder.embed(images), reference, atol=1e-6)
    alone = np.concatenate([encoder.embed([image]) for image in images])
    assert np.min(cosines(encoder.embed(images), reference)) >= 0.99
    assert np.min(cosines(alone, reference)) >= 0.99


def test_fast_cpu_auto_refuses_int8_that_moves_embeddings(
    tiny_clip_dir: Path, fp32_encoder: ClipImageEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scrambling_quantiser(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        scrambled = copy.deepcopy(model)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            weight = scrambled.visual_projection.weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
        return scrambled

    monkeypatch.setattr(int8, "quantise", scrambling_quantiser)
    images = pictures(4)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="int8"))

    assert encoder.precision == "fp32"
    assert encoder.notes[-1].startswith("int8 refused")
    np.testing.assert_allclose(encoder.embed(images), fp32_encoder.embed(images), atol=1e-6)


def test_fast_cpu_auto_keeps_int8_that_keeps_embeddings(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def faithful_quantiser(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        return model

    monkeypatch.setattr(int8, "quantise", faithful_quantiser)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="int8"))

    assert encoder.precision == "int8-dynamic"
    assert encoder.notes[-1].startswith("int8 kept")


def _slowed(model: torch.nn.Module) -> torch.nn.Module:
    model.register_forward_pre_hook(lambda *_: time.sleep(0.02))
    return model


def test_fast_cpu_auto_refuses_int8_slower_than_fp32_on_this_model(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int8, "matmul_speedup", lambda: 4.0)  # a CPU with fast int8 products
    monkeypatch.setattr(int8, "quantise", lambda model, *a, **k: _slowed(copy.deepcopy(model)))

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="auto"))

    assert encoder.precision in ("fp32", "bf16")  # bf16 is tried next where the CPU has it
    int8_note = next(note for note in encoder.notes if note.startswith("int8"))
    assert int8_note.startswith("int8 refused: min cosine 1.0000")
    assert float(int8_note.rsplit(", x", 1)[1].split()[0]) < 1.0


def test_fast_cpu_auto_keeps_int8_faster_than_fp32_on_this_model(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def quantise_and_slow_the_original(model: torch.nn.Module, *a: object, **k: object) -> object:
        fast = copy.deepcopy(model)
        _slowed(model)  # fp32 now takes 20 ms more a pass
        return fast

    monkeypatch.setattr(int8, "matmul_speedup", lambda: 4.0)
    monkeypatch.setattr(int8, "quantise", quantise_and_slow_the_original)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="auto"))

    assert encoder.precision == "int8-dynamic"
    assert encoder.notes[0].startswith("int8 kept: min cosine 1.0000")
    assert float(encoder.notes[0].rsplit(", x", 1)[1].split()[0]) >= 1.1


def test_int8_embeds_large_batches_in_passes_of_a_few_images(
    tiny_clip_dir: Path, fp32_encoder: ClipImageEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(  # the tiny model's int8 verdict is not what this test is about
        int8, "quantise", lambda model, *a, **k: copy.deepcopy(model)
    )
    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="int8"))
    passes: list[int] = []
    encoder.model.register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(len(kwargs["pixel_values"])), with_kwargs=True
    )
    images = pictures(2 * encoder_module.INT8_FORWARD + 3)

    rows = encoder.embed(images)

    assert encoder.max_forward == encoder_module.INT8_FORWARD
    assert passes == [encoder_module.INT8_FORWARD, encoder_module.INT8_FORWARD, 3]
    assert np.min(cosines(rows, fp32_encoder.embed(images))) >= 0.99


def test_fast_cpu_auto_falls_back_to_bf16_when_int8_is_refused(
    tiny_clip_dir: Path, fp32_encoder: ClipImageEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scrambling_quantiser(model: torch.nn.Module, *args: object, **kwargs: object) -> object:
        scrambled = copy.deepcopy(model)
        with torch.no_grad():
            scrambled.visual_projection.weight.mul_(-1.0)
        return scrambled

    monkeypatch.setattr(int8, "quantise", scrambling_quantiser)
    monkeypatch.setattr(int8, "matmul_speedup", lambda: 3.0)
    monkeypatch.setattr(encoder_module, "bf16_supported", lambda: True)
    monkeypatch.setattr(encoder_module, "_gain", lambda *a, **k: 2.0)  # speed is not the point
    images = pictures(4)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="auto"))

    assert (encoder.precision, encoder.dtype, encoder.max_forward) == ("bf16", torch.bfloat16, None)
    assert encoder.notes[0].startswith("int8 refused")
    assert encoder.notes[1].startswith("bf16 kept")
    assert np.min(cosines(encoder.embed(images), fp32_encoder.embed(images))) >= 0.99


def test_fast_cpu_auto_skips_int8_on_a_cpu_that_multiplies_int8_slowly(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[object] = []
    monkeypatch.setattr(int8, "matmul_speedup", lambda: 0.06)
    monkeypatch.setattr(int8, "quantise", lambda model, *a, **k: tried.append(model))
    monkeypatch.setattr(encoder_module, "bf16_supported", lambda: False)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="auto"))

    assert tried == []
    assert encoder.precision == "fp32"
    assert encoder.notes[0] == (
        "int8 skipped: this CPU multiplies int8 matrices x0.06 as fast as fp32 (no VNNI "
        "instructions)"
    )


def test_fast_cpu_int8_asked_for_is_tried_whatever_the_cpu(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int8, "matmul_speedup", lambda: 0.06)
    monkeypatch.setattr(int8, "quantise", lambda model, *a, **k: copy.deepcopy(model))

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="int8"))

    assert encoder.precision == "int8-dynamic"


def test_int8_matmul_speedup_compares_int8_with_fp32_products() -> None:
    speedup = int8.matmul_speedup.__wrapped__(rows=32, size=128)

    assert 0.001 < speedup < 100


def test_fast_cpu_refuses_bf16_that_moves_embeddings(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def scrambled_bf16(model: torch.nn.Module) -> torch.nn.Module:
        scrambled = copy.deepcopy(model).to(torch.bfloat16)
        with torch.no_grad():
            scrambled.visual_projection.weight.mul_(-1.0)
        return scrambled

    monkeypatch.setattr(encoder_module, "bf16_supported", lambda: True)
    monkeypatch.setattr(encoder_module, "_bf16", scrambled_bf16)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="bf16"))

    assert (encoder.precision, encoder.dtype) == ("fp32", torch.float32)
    assert encoder.notes[-1].startswith("bf16 refused")


def test_fast_cpu_skips_bf16_on_a_cpu_without_it(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder_module, "bf16_supported", lambda: False)

    encoder = load_encoder(ModelSettings(name=str(tiny_clip_dir), device="cpu", fast_cpu="bf16"))

    assert encoder.precision == "fp32"
    assert encoder.notes == ["bf16 skipped: this CPU has no native bf16"]


# --- refusals -----------------------------------------------------------------------------------


def test_load_encoder_missing_directory_names_lookalike_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"

    with pytest.raises(ModelLoadError) as caught:
        load_encoder(ModelSettings(name=str(missing)))

    assert "LOOKALIKE_MODEL" in str(caught.value)
    assert str(missing) in str(caught.value)


def test_load_encoder_refuses_non_clip_checkpoint(tiny_clip_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    processor = (tiny_clip_dir / "preprocessor_config.json").read_text()
    (tmp_path / "preprocessor_config.json").write_text(processor)

    with pytest.raises(ModelLoadError, match="LOOKALIKE_MODEL=.* not a CLIP checkpoint"):
        load_encoder(ModelSettings(name=str(tmp_path)))


def test_load_encoder_refuses_unknown_random_model() -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_encoder(ModelSettings(name="random:nope"))

    assert "LOOKALIKE_MODEL=random:nope" in str(caught.value)
    assert "random:vit-b-32" in str(caught.value)


# --- the opt-in random model --------------------------------------------------------------------


def test_random_vit_b_32_loads_flagged_random(random_encoder: ClipImageEncoder) -> None:
    embeddings = random_encoder.embed(pictures(2))

    assert random_encoder.is_random is True
    assert random_encoder.model_id == "random:vit-b-32"
    assert random_encoder.dim == 512  # ViT-B/32's projection
    assert embeddings.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_random_vit_b_32_is_the_same_on_every_load(random_encoder: ClipImageEncoder) -> None:
    torch.manual_seed(12345)  # the global seed must not matter
    again = load_encoder(ModelSettings(name="random:vit-b-32", device="cpu", fast_cpu="off"))
    images = pictures(3)

    np.testing.assert_array_equal(again.embed(images), random_encoder.embed(images))


def test_random_model_load_leaves_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)

    load_encoder(ModelSettings(name="random:vit-b-32", device="cpu", fast_cpu="off"))

    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    ("configured", "device", "expected"),
    [
        (None, "cpu", 32),
        (None, "cuda", 256),
        (None, "cuda:1", 256),
        (64, "cuda", 64),
        (8, "cpu", 8),
    ],
)
def test_index_builds_use_large_batches_on_a_gpu_unless_told(
    configured: int | None, device: str, expected: int
) -> None:
    assert encoder_module.index_batch_size(configured, device) == expected
