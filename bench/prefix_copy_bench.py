"""What sharing a cached prefix costs on this CPU: copying it into the
request's slot once (what specray does), against a block table that reads
shared blocks in place and must gather them into contiguous keys and values
in every layer of every forward (CPU attention kernels take contiguous
tensors).

For each context length, with the target's real cache shapes (layers, KV
heads, head dim; no weights are loaded):

* ``attach ms``: ``BlockPool.load`` of the prefix into a slot, once per request;
* ``save ms``: ``BlockPool.save`` of as many blocks out of a slot (spread
  over the rounds that commit them);
* ``gather ms/step``: one forward's gather of the same context from
  paged blocks, every layer, keys and values (a block table's cost per step);
* ``break-even steps``: attach ÷ gather: after that many forwards the
  copy is cheaper.

    python -m specray.bench.prefix_copy_bench --target qwen2.5-coder-0.5b-instruct

Writes ``prefix_copy_<target>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from specray.actors.model.block_pool import BlockPool
from specray.actors.model.config import ModelConfig
from specray.actors.model.kv_cache import KVCache
from specray.actors.model.prefix_cache import DEFAULT_BLOCK_SIZE
from specray.bench.common import bench_parser, int_list, resolve_preferring, timed_ms
from specray.bench.run_report import column_report, publish_run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLUMNS = {
    "dtype": "dtype",
    "context": "context",
    "KV MiB": "kv_mib",
    "attach ms (once)": "attach_ms",
    "save ms": "save_ms",
    "gather ms per forward": "gather_ms_per_step",
    "break-even forwards": "break_even_steps",
}


def measure(config: ModelConfig, dtype: torch.dtype, context: int, repeats: int) -> dict[str, Any]:
    size = DEFAULT_BLOCK_SIZE
    blocks = context // size
    layers, kv_heads, head_dim = config.num_layers, config.num_kv_heads, config.head_dim
    cache = KVCache(layers, 2, context, kv_heads, head_dim, dtype)
    cache.keys.normal_()
    cache.values.normal_()
    pool = BlockPool(cache, blocks, size)
    ids = list(range(blocks))
    attach = timed_ms(lambda: pool.load(1, ids), repeats, min)
    save = timed_ms(lambda: pool.save(0, 0, ids), repeats, min)
    # A paged layout: [layers, blocks, kv_heads, block, head_dim] per tensor.
    paged = [torch.randn(layers, blocks, kv_heads, size, head_dim, dtype=dtype) for _ in range(2)]
    table = torch.tensor(ids)

    def gather_step() -> None:
        for layer in range(layers):
            for tensor in paged:
                rows = tensor[layer].index_select(0, table)  # [blocks, kv_heads, block, head_dim]
                rows.transpose(0, 1).reshape(kv_heads, context, head_dim)

    gather = timed_ms(gather_step, repeats, min)
    return {
        "context": context,
        "attach_ms": round(attach, 3),
        "save_ms": round(save, 3),
        "gather_ms_per_step": round(gather, 3),
        "break_even_steps": round(attach / gather, 2) if gather > 0 else None,
        "kv_mib": round(
            2 * layers * kv_heads * context * head_dim * cache.keys.element_size() / 2**20, 2
        ),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_pretrained(resolve_preferring(args.target, "float32"))
    rows = [
        {"dtype": name, **measure(config, DTYPES[name], context, args.repeats)}
        for name in args.dtypes
        for context in args.contexts
    ]
    shapes = {
        "layers": config.num_layers,
        "kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "block_size": DEFAULT_BLOCK_SIZE,
    }
    flags = ("target", "threads", "repeats")
    return publish_run(
        "specray.bench.prefix_copy_bench", "prefix_copy", argv, args, flags, markdown,
        shapes=shapes, rows=rows,
    )  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    shapes = result["shapes"]
    title = (
        f"Copy on attach vs a block table: {result['target']} cache shapes "
        f"({shapes['layers']} layers, {shapes['kv_heads']} KV heads, head dim "
        f"{shapes['head_dim']}, blocks of {shapes['block_size']}; {result['threads']} threads, "
        f"best of {result['repeats']})"
    )
    return column_report(title, result, COLUMNS)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__, dtype=None)
    p.add_argument("--contexts", type=int_list, default=[256, 1024, 4096])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    return p


if __name__ == "__main__":
    main()
