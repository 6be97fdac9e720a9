"""Quantized GGUF blocks and tiny quantized GGUF checkpoints for tests.

Types that ``gguf`` can quantize (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized
from random weights; the K-quants (Q4_K, Q5_K, Q6_K), which ``gguf`` only
dequantizes, are random blocks whose fp16 fields hold small finite values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# Byte offsets of the fp16 fields (d, and dmin or m) inside one block.
FP16_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
QUANTIZABLE = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0}


def random_blocks(
    qtype: Q, rows: int, cols: int, rng: np.random.Generator, magnitude: float = 1e-3
) -> np.ndarray:
    """``[rows, bytes]`` uint8 of ``qtype`` blocks: random codes and scale
    bits, fp16 fields uniform in ``±magnitude``."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block_size
    raw = rng.integers(0, 256, (blocks, type_size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        values = rng.uniform(-magnitude, magnitude, blocks).astype(np.float16)
        raw[:, offset : offset + 2] = values.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, cols // block_size * type_size)


def quantized(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A ``[rows, cols]`` weight of scale ~0.05 in ``qtype`` blocks."""
    if qtype in QUANTIZABLE:
        weight = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return gguf.quants.quantize(weight, qtype)
    return random_blocks(qtype, rows, cols, rng, magnitude=1e-4)


HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 160
HEAD_DIM = HIDDEN // HEADS

# Role -> type. Row-parallel inputs (o, down) in 4-bit types, which TP slices
# without changing their values; column-parallel ones in every other type.
MIXED_TYPES: Mapping[str, Q] = {
    "token_embd": Q.Q5_0,
    "output": Q.Q6_K,
    "attn_q": Q.Q5_0,
    "attn_k": Q.Q8_0,
    "attn_v": Q.Q4_1,
    "attn_output": Q.Q4_K,
    "ffn_gate": Q.Q4_0,
    "ffn_up": Q.Q5_K,
    "ffn_down": Q.Q4_K,
}


def write_tiny_qwen2(
    directory: Path, types: Mapping[str, Q] = MIXED_TYPES, seed: int = 0, tied: bool = False
) -> Path:
    """A 2-layer Qwen2 model dir: ``config.json`` and ``model.gguf`` (without
    ``output.weight`` when ``tied``: the head reuses the token embedding)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(directory / "model.gguf"), "qwen2")
    writer.add_block_count(LAYERS)

    def matrix(name: str, role: str, rows: int, cols: int) -> None:
        qtype = types[role]
        writer.add_tensor(name, quantized(qtype, rows, cols, rng), raw_dtype=qtype)

    def vector(name: str, size: int, around: float) -> None:
        writer.add_tensor(name, (around + 0.1 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", "token_embd", VOCAB, HIDDEN)
    if not tied:
        matrix("output.weight", "output", VOCAB, HIDDEN)
    vector("output_norm.weight", HIDDEN, 1.0)
    kv = KV_HEADS * HEAD_DIM
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        vector(f"{block}.attn_norm.weight", HIDDEN, 1.0)
        vector(f"{block}.ffn_norm.weight", HIDDEN, 1.0)
        matrix(f"{block}.attn_q.weight", "attn_q", HIDDEN, HIDDEN)
        matrix(f"{block}.attn_k.weight", "attn_k", kv, HIDDEN)
        matrix(f"{block}.attn_v.weight", "attn_v", kv, HIDDEN)
        for name, size in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
            vector(f"{block}.{name}.bias", size, 0.0)
        matrix(f"{block}.attn_output.weight", "attn_output", HIDDEN, HIDDEN)
        matrix(f"{block}.ffn_gate.weight", "ffn_gate", FFN, HIDDEN)
        matrix(f"{block}.ffn_up.weight", "ffn_up", FFN, HIDDEN)
        matrix(f"{block}.ffn_down.weight", "ffn_down", HIDDEN, FFN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return directory
