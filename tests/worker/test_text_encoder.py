"""CLIP's text tower: the byte-level stand-in tokenizer, loading, and what its rows promise."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from shared.errors import ModelLoadError
from worker.text_encoder import (
    MAX_TOKENS,
    ClipTextEncoder,
    byte_level_tokenizer,
    load_text_encoder,
)

TINY_DIM = 32  # the tiny CLIP's projection size
START, END = 49406, 49407


@pytest.fixture(scope="module")
def text_encoder(tiny_clip_dir: Path) -> ClipTextEncoder:
    return load_text_encoder(str(tiny_clip_dir), device="cpu")


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return byte_level_tokenizer()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def copy_of(tiny_clip_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(tiny_clip_dir, target)
    return target


def assert_refused_naming_text_search(directory: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_text_encoder(str(directory), device="cpu")
    assert "LOOKALIKE_TEXT_SEARCH=off" in str(caught.value)


# --- byte_level_tokenizer --------------------------------------------------------------------


def test_byte_level_tokenizer_wraps_text_in_clips_special_ids(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("shoe")["input_ids"]

    # One id per byte (printable ASCII byte b is b - 33); the word's last byte is its </w> form.
    assert ids == [START, ord("s") - 33, ord("h") - 33, ord("o") - 33, 256 + ord("e") - 33, END]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (START, END)
    assert tokenizer.convert_ids_to_tokens([START, END]) == ["<|startoftext|>", "<|endoftext|>"]


@pytest.mark.parametrize("text", ["a red shoe", "ünïcode ✓ 靴 🥾", "naïve café façade"])
def test_byte_level_tokenizer_round_trips_unicode(tokenizer: CLIPTokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]

    assert ids[0] == START and ids[-1] == END
    assert all(0 <= i < 512 for i in ids[1:-1])  # every byte has an id of its own
    assert len(ids) - 2 == len(text.replace(" ", "").encode())
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_byte_level_tokenizer_never_needs_an_unknown_token(tokenizer: CLIPTokenizer) -> None:
    every_byte = bytes(range(33, 256)).decode("latin-1")

    ids = tokenizer(every_byte)["input_ids"]

    assert END not in ids[1:-1]  # the unknown token is <|endoftext|>: never used inside


def test_byte_level_tokenizer_truncates_to_clips_context(tokenizer: CLIPTokenizer) -> None:
    tokens = tokenizer(["word " * 300, "a"], padding=True, truncation=True, max_length=MAX_TOKENS)

    assert [len(ids) for ids in tokens["input_ids"]] == [MAX_TOKENS, MAX_TOKENS]
    assert tokens["input_ids"][0][-1] == END  # cut text still ends with the end token
    assert tokens["attention_mask"][1] == [1, 1, 1] + [0] * (MAX_TOKENS - 3)


# --- load_text_encoder and embed -------------------------------------------------------------


def test_text_encoder_embeds_a_batch_to_normalised_float32_rows(
    text_encoder: ClipTextEncoder, tiny_clip_dir: Path
) -> None:
    rows = text_encoder.embed(["a shoe", "a red handbag", "ankle boot", ""])

    assert rows.shape == (4, TINY_DIM)
    assert rows.dtype == np.float32
    assert rows.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(rows[0], rows[1], atol=1e-3)  # different texts, different rows
    assert (text_encoder.model_id, text_encoder.device) == (str(tiny_clip_dir), "cpu")


def test_text_encoder_row_is_the_same_alone_and_in_a_batch(text_encoder: ClipTextEncoder) -> None:
    alone = text_encoder.embed(["a shoe"])[0]

    batch = text_encoder.embed(["a much longer description of a leather shoe", "a shoe", "x"])

    assert cosine(alone, batch[1]) > 0.999
    assert cosine(alone, text_encoder.embed(["a shoe"])[0]) > 0.999999  # deterministic


def test_text_encoder_truncates_a_very_long_text(text_encoder: ClipTextEncoder) -> None:
    prefix = "a leather shoe " * 40  # far beyond 77 byte tokens

    rows = text_encoder.embed([prefix + "in red", prefix + "in blue", "x" * 10_000])

    assert rows.shape == (3, TINY_DIM)
    assert np.isfinite(rows).all()
    assert cosine(rows[0], rows[1]) > 0.9999  # the endings were cut: the same query


def test_text_encoder_is_in_eval_mode_on_the_cpu(text_encoder: ClipTextEncoder) -> None:
    assert not text_encoder.model.training
    assert next(text_encoder.model.parameters()).device.type == "cpu"


def test_load_text_encoder_of_a_missing_directory_names_text_search(tmp_path: Path) -> None:
    assert_refused_naming_text_search(tmp_path / "nowhere")


def test_load_text_encoder_of_an_unknown_random_model_names_the_model() -> None:
    with pytest.raises(ModelLoadError, match=r"^LOOKALIKE_MODEL=random:vit-nope is unknown"):
        load_text_encoder("random:vit-nope", device="cpu")


def test_load_text_encoder_without_weights_names_text_search(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    checkpoint = copy_of(tiny_clip_dir, tmp_path)
    (checkpoint / "model.safetensors").unlink()

    assert_refused_naming_text_search(checkpoint)


def test_load_text_encoder_without_a_tokenizer_names_text_search(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    checkpoint = copy_of(tiny_clip_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()

    assert_refused_naming_text_search(checkpoint)


def test_load_text_encoder_without_text_weights_names_text_search(
    tiny_clip_dir: Path, tmp_path: Path
) -> None:
    checkpoint = copy_of(tiny_clip_dir, tmp_path)
    weights = load_file(checkpoint / "model.safetensors")
    vision_only = {k: v for k, v in weights.items() if not k.startswith("text_")}
    assert len(vision_only) < len(weights)
    save_file(vision_only, checkpoint / "model.safetensors", metadata={"format": "pt"})

    assert_refused_naming_text_search(checkpoint)


def test_load_text_encoder_of_a_vision_only_checkpoint_names_text_search(tmp_path: Path) -> None:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=TINY_DIM,
    )
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "vision")
    byte_level_tokenizer().save_pretrained(tmp_path / "vision")

    assert_refused_naming_text_search(tmp_path / "vision")
