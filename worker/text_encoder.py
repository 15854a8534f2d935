"""CLIP's text tower: a text query embedded into the images' space.

Loaded only when text search is on (``LOOKALIKE_TEXT_SEARCH=on``), from the same checkpoint
as the image tower (``CLIPTextModelWithProjection`` and its tokenizer, via
``from_pretrained``). With ``random:vit-b-32`` it is a random tower of ViT-B/32's text shape
and a byte-level stand-in tokenizer (the real vocabulary cannot be downloaded offline): its
matches are as meaningless as the random image tower's.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.utils import logging as hf_logging

from shared.errors import ModelLoadError
from shared.schemas import Embeddings
from shared.settings import RANDOM_MODEL_PREFIX
from worker.encoder import RANDOM_SEED, RANDOM_SHAPES, accelerator_dtype, first_line, tower_config

log = logging.getLogger(__name__)

MAX_TOKENS = 77  # CLIP's context length: longer queries are cut
NEEDS_TEXT = (
    "Text search needs a full CLIP checkpoint with its tokenizer; "
    "set LOOKALIKE_TEXT_SEARCH=off to serve images only."
)


@dataclass
class ClipTextEncoder:
    model_id: str
    model: torch.nn.Module
    tokenizer: Any
    device: str
    dtype: torch.dtype

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> Embeddings:
        """L2-normalised float32 rows, one per text, in one forward pass."""
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        tokens = {name: value.to(self.device) for name, value in tokens.items()}
        features = self.model(**tokens).text_embeds.float()
        features = torch.nn.functional.normalize(features, dim=-1)
        return np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer without merges: one token per byte, CLIP's special token ids.

    Only for random models (and tests): real checkpoints ship their own vocabulary.
    """
    chars = list(_bytes_to_unicode().values())
    vocab = {char: i for i, char in enumerate(chars)}
    vocab.update({char + "</w>": 256 + i for i, char in enumerate(chars)})
    vocab["<|startoftext|>"] = 49406
    vocab["<|endoftext|>"] = 49407
    return CLIPTokenizer(vocab=vocab, merges=[])


def _load(name: str) -> tuple[torch.nn.Module, Any]:
    if name.startswith(RANDOM_MODEL_PREFIX):
        shape = name.removeprefix(RANDOM_MODEL_PREFIX)
        if shape not in RANDOM_SHAPES:
            raise ModelLoadError(f"LOOKALIKE_MODEL={name} is unknown")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED + 1)
            model = CLIPTextModelWithProjection(CLIPTextConfig(**RANDOM_SHAPES[shape]))
        return model, byte_level_tokenizer()
    text_config = tower_config(name, "text")
    if text_config is None:
        found = type(AutoConfig.from_pretrained(name)).__name__
        raise ModelLoadError(f"{name!r} has no text tower ({found}). {NEEDS_TEXT}")
    model, info = CLIPTextModelWithProjection.from_pretrained(
        name, config=text_config, output_loading_info=True
    )
    missing = [key for key in info.get("missing_keys", ()) if "position_ids" not in key]
    if missing:  # transformers would run a randomly initialised text tower
        raise ModelLoadError(
            f"{name!r} lacks text weights ({', '.join(sorted(missing)[:3])}...). {NEEDS_TEXT}"
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    _check_tokenizer(name, tokenizer)
    return model, tokenizer


def _check_tokenizer(name: str, tokenizer: Any) -> None:
    """A checkpoint without tokenizer files yields an empty vocabulary: every text would be
    the unknown token, and every text query would return the same matches."""
    ids = tokenizer("a photo of a shoe")["input_ids"]
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    words = [i for i in ids if i not in special]
    if not words or all(i == tokenizer.unk_token_id for i in words):
        raise ModelLoadError(f"{name!r} has no usable tokenizer files. {NEEDS_TEXT}")


def load_text_encoder(name: str, *, device: str) -> ClipTextEncoder:
    """Load CLIP's text tower and tokenizer; raise :class:`ModelLoadError` naming the setting."""
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the skipped vision weights are not news
            try:
                model, tokenizer = _load(name)
            finally:
                hf_logging.set_verbosity(verbosity)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"Could not load the text tower of {name!r}: {first_line(error)}. {NEEDS_TEXT}"
        ) from error
    dtype = accelerator_dtype(device)
    model = model.eval().to(device=device, dtype=dtype)
    log.info("loaded the text tower of %s in %.1fs", name, time.perf_counter() - started)
    return ClipTextEncoder(
        model_id=name, model=model, tokenizer=tokenizer, device=device, dtype=dtype
    )
