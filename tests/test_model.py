"""Our decoder against Hugging Face transformers on the same weights, and the
KV cache's prefill / decode / rollback / batching invariants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from decode_helpers import cached_greedy
from references import hf_greedy
from tiny_models import VOCAB
from transformers import AutoModelForCausalLM

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model


def _hf(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _forward_all(
    model: DecoderModel, token_ids: list[int], hidden_layers: tuple[int, ...] = ()
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    cache = model.new_cache(1, 256)
    slot = cache.allocate()
    out = model(
        ForwardBatch.build([SequenceInput(slot, token_ids, 0, len(token_ids))]),
        cache,
        hidden_layers,
    )
    if hidden_layers:
        assert out.hidden_states is not None
        return out.logits, out.hidden_states
    return out.logits


def _assert_close_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * max(scale, 1.0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_logits_match_transformers(tiny_model_dir: Path) -> None:
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (12,)).tolist()
    with torch.no_grad():
        ref = _hf(tiny_model_dir)(torch.tensor([ids])).logits[0]
    ours = _forward_all(load_model(tiny_model_dir), ids)
    assert isinstance(ours, torch.Tensor)
    _assert_close_logits(ours, ref)


def test_hidden_states_match_transformers(tiny_model_dir: Path) -> None:
    ids = list(range(3, 13))
    with torch.no_grad():
        ref = _hf(tiny_model_dir)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    model = load_model(tiny_model_dir)
    _, hidden = _forward_all(model, ids, hidden_layers=(0, 1))
    hsize = model.config.hidden_size
    # HF's hidden_states[0] is the embedding; [i + 1] is layer i's output.
    torch.testing.assert_close(hidden[:, :hsize], ref[1][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden[:, hsize:], ref[2][0], atol=1e-5, rtol=1e-4)


def test_greedy_generation_matches_transformers(tiny_model_dir: Path) -> None:
    prompt = [5, 9, 17, 33, 8]
    (ref,) = hf_greedy(tiny_model_dir, [prompt], 12)
    assert cached_greedy(load_model(tiny_model_dir), prompt, 12, max_len=64).tokens == ref


def test_prefill_then_decode_equals_full_forward(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    ids = torch.randint(3, VOCAB, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    full = _forward_all(model, ids)
    assert isinstance(full, torch.Tensor)
    cache = model.new_cache(1, 64)
    slot = cache.allocate()
    rows = [model(ForwardBatch.build([SequenceInput(slot, ids[:6], 0, 6)]), cache).logits]
    for i in range(6, 14, 3):  # decode in chunks of 3, 3, 2
        chunk = ids[i : i + 3]
        rows.append(
            model(ForwardBatch.build([SequenceInput(slot, chunk, i, len(chunk))]), cache).logits
        )
    torch.testing.assert_close(torch.cat(rows), full, atol=1e-5, rtol=1e-5)


def test_truncate_then_redecode_equals_fresh_cache(tiny_model_dir: Path) -> None:
    """Rollback after rejected drafts, across Gemma's sliding window (5)."""
    model = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, VOCAB, (9,), generator=gen).tolist()
    rejected = torch.randint(3, VOCAB, (6,), generator=gen).tolist()
    accepted = torch.randint(3, VOCAB, (7,), generator=gen).tolist()

    cache = model.new_cache(1, 64)
    slot = cache.allocate()
    model(ForwardBatch.build([SequenceInput(slot, prefix + rejected, 0)]), cache)
    cache.truncate(slot, len(prefix) + 2)  # keep two of the draft tokens
    kept = prefix + rejected[:2]
    rolled = model(
        ForwardBatch.build([SequenceInput(slot, accepted, len(kept), len(accepted))]), cache
    ).logits
    fresh = _forward_all(model, kept + accepted)
    assert isinstance(fresh, torch.Tensor)
    torch.testing.assert_close(rolled, fresh[len(kept) :], atol=1e-5, rtol=1e-5)


def test_mixed_length_batch_equals_each_alone(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 1, 7)]
    alone = [_forward_all(model, p) for p in prompts]

    cache = model.new_cache(6, 64)
    cache.allocate()  # leave slot gaps so the batch reads non-contiguous slots
    slots = [cache.allocate() for _ in prompts]
    cache.free(slots[1])
    slots[1] = cache.allocate()
    seqs = [SequenceInput(s, p, 0, len(p)) for s, p in zip(slots, prompts, strict=True)]
    out = model(ForwardBatch.build(seqs), cache)
    for got, want in zip(out.split([len(p) for p in prompts]), alone, strict=True):
        assert isinstance(want, torch.Tensor)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # Then a batched decode step of different lengths per sequence.
    steps = [[5], [6, 7], [8], [9, 10, 11]]
    seqs = [
        SequenceInput(s, step, len(p), len(step))
        for s, p, step in zip(slots, prompts, steps, strict=True)
    ]
    out = model(ForwardBatch.build(seqs), cache)
    for got, prompt, step in zip(out.split([len(s) for s in steps]), prompts, steps, strict=True):
        want = _forward_all(model, prompt + step)
        assert isinstance(want, torch.Tensor)
        torch.testing.assert_close(got, want[len(prompt) :], atol=1e-5, rtol=1e-5)


def test_hidden_states_of_a_mixed_batch_equal_each_alone(tiny_model_dir: Path) -> None:
    """A prefill next to a decode: the packed rows hand back each sequence's
    own hidden states, in batch order."""
    model = load_model(tiny_model_dir)
    prompt, other = list(range(3, 12)), [4, 5, 6]
    layers = (0, 1)
    cache = model.new_cache(2, 64)
    first, second = cache.allocate(), cache.allocate()
    model(ForwardBatch.build([SequenceInput(second, other, 0, 1)]), cache)
    seqs = [SequenceInput(first, prompt, 0, 2), SequenceInput(second, [7], len(other), 1)]
    out = model(ForwardBatch.build(seqs), cache, layers)
    assert out.hidden_states is not None
    want_first = _forward_all(model, prompt, layers)
    want_second = _forward_all(model, [*other, 7], layers)
    assert isinstance(want_first, tuple) and isinstance(want_second, tuple)
    torch.testing.assert_close(out.hidden_states[:2], want_first[1][-2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden_states[2:], want_second[1][-1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[2:], want_second[0][-1:], atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32(tiny_model_dir: Path) -> None:
    ids = list(range(3, 20))
    fp32 = _forward_all(load_model(tiny_model_dir), ids)
    bf16 = _forward_all(load_model(tiny_model_dir, "bfloat16"), ids)
    assert isinstance(fp32, torch.Tensor) and isinstance(bf16, torch.Tensor)
    assert bf16.dtype == torch.float32  # logits are always returned in fp32
    assert (bf16 - fp32).abs().max().item() < 0.1 * max(fp32.abs().max().item(), 1.0)


def test_cache_full_is_a_clear_error(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    from specray.actors.model.kv_cache import CacheFullError

    model = load_model(tiny_dir_factory("qwen2"))
    cache = model.new_cache(1, 8)
    slot = cache.allocate()
    with pytest.raises(CacheFullError, match="needs 9 positions"):
        model(ForwardBatch.build([SequenceInput(slot, list(range(3, 12)), 0)]), cache)
    with pytest.raises(CacheFullError, match="all 1 KV cache slots"):
        cache.allocate()
