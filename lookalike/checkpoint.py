"""Randomly initialised CLIP checkpoints, saved with ``save_pretrained`` like a hub one.

No weights can be downloaded on the machines this project is tested and benchmarked on, so the
tests and the benchmarks save a random CLIP of the right shape to a folder and load it through
``from_pretrained``, the path a real checkpoint takes. Its matches mean nothing (every result
and log line says the model is not a real one only for ``random:`` models; a saved random
checkpoint is for tests and benchmarks, never for users).

* ``tiny``: 2 layers of width 32: loads in a blink, for tests;
* ``vit-b-32``: ViT-B/32's exact shape and compute, for benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A large initializer factor spreads random embeddings apart, so rankings are meaningful enough
# to test (default random weights map every image to nearly the same point); compute is the same.
SPREAD = 5.0
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "vocab_size": 49408,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
            "initializer_factor": SPREAD,
        },
        "projection_dim": 32,
        "initializer_factor": SPREAD,
    },
    # CLIPConfig's defaults are ViT-B/32's shape.
    "vit-b-32": {
        "text_config": {"initializer_factor": SPREAD},
        "vision_config": {"initializer_factor": SPREAD},
        "initializer_factor": SPREAD,
    },
}


def save_random_clip(directory: Path, *, shape: str = "tiny", seed: int = 0) -> Path:
    """Save a random CLIP of ``shape`` with its image processor and tokenizer in ``directory``.

    The processor is named ``CLIPImageProcessor`` in its config, as hub checkpoints name it.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    from worker.encoder import ImageProcessor
    from worker.text_encoder import byte_level_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: {', '.join(SHAPES)}")
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**SHAPES[shape]))
    model.save_pretrained(directory)
    ImageProcessor().save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)  # a real checkpoint ships its vocabulary
    path = directory / "preprocessor_config.json"
    processor = json.loads(path.read_text())
    processor["image_processor_type"] = "CLIPImageProcessor"
    path.write_text(json.dumps(processor, indent=2))
    return directory
