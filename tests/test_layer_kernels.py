"""The steps of a decoder layer around its matmuls on the compiled kernels
(csrc/row_norm.cpp, csrc/rotary.cpp, csrc/cache_rows.cpp) against torch's
operators: rotary and the cache write bit for bit, RMSNorm within its one
reordered sum; each row on its own; torch's path where the kernels do not
run (switched off, autograd)."""

from __future__ import annotations

import pytest
import torch

from specray.actors.model.config import RopeConfig
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.norm import RMSNorm
from specray.actors.model.rotary import RotaryEmbedding, apply_rotary
from specray.actors.parallel.block_kernel import SWITCH, block_kernel_reason, load_block_kernel

needs_kernel = pytest.mark.skipif(
    block_kernel_reason() is not None, reason=f"kernels: {block_kernel_reason()}"
)


def _torch_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rope(tokens: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), head_dim)
    return rotary(torch.arange(100, 100 + tokens), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel_is_torchs_arithmetic_bit_for_bit(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    # Query and key heads as the fused projection lays them out: a view with
    # a token stride wider than its heads.
    fused = (torch.randn(5, 10, 64, generator=gen) * 4).to(dtype)
    heads = fused[:, :8]
    cos, sin = _rope(5, 64, dtype)
    got = load_block_kernel().rotary(heads, cos.reshape(5, 64), sin.reshape(5, 64))
    assert got is not None and got.is_contiguous()
    assert torch.equal(got, _torch_rotary(heads, cos, sin))
    with torch.no_grad():
        assert torch.equal(apply_rotary(heads, cos, sin), got)


def test_rotary_keeps_torchs_path_under_autograd_and_when_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 32, generator=gen, requires_grad=True)
    cos, sin = _rope(3, 32, torch.float32)
    out = apply_rotary(x, cos, sin)
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None
    monkeypatch.setenv(SWITCH, "off")
    with torch.no_grad():
        assert torch.equal(apply_rotary(x, cos, sin), _torch_rotary(x, cos, sin))


FLAVOURS = {
    "llama": {},
    "gemma": {"gemma": True},
    "float weight": {"float_weight": True},
}


@needs_kernel
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_torch_up_to_its_sum_order(
    flavour: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the sum of squares is ordered differently from the module's torch
    operators: float32 results agree to float32 rounding, and bf16 ones are
    torch's but for rare ties one bf16 step apart."""
    gen = torch.Generator().manual_seed(2)
    norm = RMSNorm(256, 1e-6, dtype, **FLAVOURS[flavour])
    norm.weight.data.copy_(torch.randn(256, generator=gen) * 0.5 + 1)
    x = (torch.randn(64, 256, generator=gen) * 3).to(dtype)
    with torch.no_grad():
        got = norm(x)
        monkeypatch.setenv(SWITCH, "off")
        want = norm(x)
    assert got.dtype == want.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=0, rtol=2e-6)
        return
    same = (got == want).float().mean().item()
    assert same > 0.99, f"only {same:.3f} of the bf16 outputs equal torch's"
    step = want.float().abs() * 2**-7  # one bf16 step, at most
    assert bool(((got.float() - want.float()).abs() <= step).all())


@needs_kernel
def test_rms_norm_rows_are_independent_of_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(128, 1e-5, torch.bfloat16)
    norm.weight.data.copy_(torch.randn(128, generator=gen))
    x = torch.randn(9, 128, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        batch = norm(x)
        for row in range(9):
            assert torch.equal(norm(x[row : row + 1]), batch[row : row + 1])
        # A 3-D input (QK-norm over heads) is normed per last-dim row alike.
        assert torch.equal(norm(x.view(3, 3, 128)), batch.view(3, 3, 128))


def test_rms_norm_keeps_torchs_path_under_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(4)
    norm = RMSNorm(64, 1e-6, torch.float32)
    norm.weight.data.copy_(torch.randn(64, generator=gen))
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    out = norm(x)
    assert out.grad_fn is not None
    out.sum().backward()
    assert x.grad is not None
    monkeypatch.setenv(SWITCH, "off")
    assert torch.equal(out, norm(x))  # the same operators as with the kernels off


@needs_kernel
def test_the_kernels_refuse_what_they_do_not_take() -> None:
    kernel = load_block_kernel()
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert kernel.rms_norm(x, torch.ones(64), 1e-6, 0) is None  # weight dtype differs from x's
    assert kernel.rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-6, 2) is None
    assert kernel.rms_norm(torch.randn(2, 12), torch.ones(12), 1e-6, 0) is None  # 12 % 8
    cos = torch.ones(2, 24)
    assert kernel.rotary(torch.randn(2, 3, 24), cos, cos) is None  # 24 % 16


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_write_on_the_kernel_equals_torchs_indexed_assignment(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = torch.Generator().manual_seed(5)
    caches = [KVCache(2, 3, 16, 2, 32, dtype) for _ in range(2)]
    # Keys and values as views into a projection's output (strided tokens).
    projected = torch.randn(4, 6, 32, generator=gen).to(dtype)
    keys, values = projected[:, 2:4], projected[:, 4:]
    slots = torch.tensor([2, 2, 0, 1])
    positions = torch.tensor([5, 6, 15, 0])
    caches[0].write(1, slots, positions, keys, values)
    monkeypatch.setenv(SWITCH, "off")
    caches[1].write(1, slots, positions, keys, values)
    assert torch.equal(caches[0].keys, caches[1].keys)
    assert torch.equal(caches[0].values, caches[1].values)
    assert torch.equal(caches[0].keys[1, 0, :, 15], keys[2])
    monkeypatch.delenv(SWITCH)
    before = caches[0].keys.clone()
    with pytest.raises(IndexError, match="positions"):
        caches[0].write(0, slots, torch.tensor([5, 6, 16, 0]), keys, values)
    assert torch.equal(caches[0].keys, before)  # nothing written
