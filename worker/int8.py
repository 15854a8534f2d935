"""int8 on a CPU whose result never depends on the batch: linear layers with int8 weights (a
scale per output channel) and int8 activations scaled per token.

torch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``, deprecated) scales
a layer's whole input by one number: an image's embedding then depends on the other images of
its forward pass. In a service that batches strangers' uploads, a gallery image searched for
itself scored 0.89 instead of 1.0 when other uploads shared its pass (the tiny random CLIP;
tests/worker/test_int8.py). Here each token row is scaled alone, so an image embeds the same
alone or in any batch, and closer to fp32 (worst cosine over probes 0.9994 against 0.9982 for
ViT-B/32's shape). torchao's ``Int8DynamicActivationInt8WeightConfig`` does the same
arithmetic, but ran 1.7x slower at batch 1 and 1.25x at batch 8 on this CPU; this is
``torch._int_mm`` and a few element-wise steps (within 5 % of dynamic quantisation at batch 8,
20 % slower at batch 1; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import functools
import time

import torch

QMAX = 127
# int8 is worth trying only where its matrix products beat fp32's by this much: the per-token
# quantisation around them costs about 20 % at batch 1.
MIN_SPEEDUP = 1.5


class Int8Linear(torch.nn.Module):
    """``nn.Linear`` with int8 weights, its input quantised per row (token) at each call."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_(min=1e-12) / QMAX
        quantised = torch.round(weight / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        self.weight_t: torch.Tensor
        self.weight_scale: torch.Tensor
        self.bias: torch.Tensor | None
        self.register_buffer("weight_t", quantised.t().contiguous())  # (in, out) for _int_mm
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(QMAX)
        quantised = torch.div(rows, scale).round_().to(torch.int8)
        product = torch._int_mm(quantised, self.weight_t)
        scales = scale * self.weight_scale
        out = (
            torch.addcmul(self.bias, product, scales) if self.bias is not None else product * scales
        )
        return out.reshape(*shape[:-1], self.out_features)


@functools.cache
def matmul_speedup(rows: int = 64, size: int = 768) -> float:
    """How many times faster this CPU multiplies int8 matrices (``torch._int_mm``, as
    :class:`Int8Linear` does) than fp32 ones, at a ViT-B layer's size with torch's threads.

    CPUs with VNNI instructions multiply int8 several times faster than fp32; on others torch
    falls back to a plain loop: on an AMD EPYC with AVX2 only, 52 ms against fp32's 3.2 ms
    (x0.06), and int8 would make a worker's start check and every search 10x slower.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-QMAX, QMAX, (rows, size), dtype=torch.int8, generator=generator)
    b = torch.randint(-QMAX, QMAX, (size, size), dtype=torch.int8, generator=generator)
    a_float, b_float = a.float(), b.float()

    def best(product: functools.partial[torch.Tensor]) -> float:
        product()  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            product()
            times.append(time.perf_counter() - started)
        return min(times)

    with torch.inference_mode():
        integer = best(functools.partial(torch._int_mm, a, b))
        floating = best(functools.partial(torch.mm, a_float, b_float))
    return floating / max(integer, 1e-9)


def quantise(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` an :class:`Int8Linear`."""
    copied = copy.deepcopy(model)
    _swap(copied)
    return copied


def _swap(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _swap(child)
