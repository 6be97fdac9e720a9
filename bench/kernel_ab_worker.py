"""One side of ``bench/kernel_ab``: a process that loads a GGUF model with the
package it finds on its path (this tree's or another revision's), binds every
block weight's matmul and times one pass over all of them per request.

Run as the source of ``python -c`` (not as a module of this tree), so that
``specray`` resolves to whichever revision ``PYTHONPATH`` names. It uses only
APIs that the revisions compared share: ``load_model``, ``resolve_model``,
``BlockWeights`` and its kernel's ``bind``.

Protocol, one JSON object per line: it prints ``{"weights": n, "vnni": bool}``
once loaded; then, for each ``{"rows": n}`` read from stdin, it runs every
weight once on ``n`` seeded random rows and prints ``{"seconds": s,
"digest": hex}`` (the digest of all outputs, to compare builds bit for bit).
"""

import ctypes
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from specray.actors.model.loader import load_model
from specray.actors.parallel.block_weights import BlockWeights
from specray.actors.store.resolve import resolve_model


def serve(target: str, threads: int) -> None:
    torch.set_num_threads(threads)
    # A model folder as it is (a test's tiny model); a name through the store.
    model_dir = Path(target) if Path(target).is_dir() else resolve_model(target)
    model = load_model(model_dir, torch.bfloat16, weights="gguf")
    weights = [m for m in model.modules() if isinstance(m, BlockWeights)]
    bound = [w.kernel.bind(w.packed()) for w in weights]
    print(json.dumps({"weights": len(weights), "vnni": bool(weights and weights[0].kernel.vnni)}))
    sys.stdout.flush()
    tensors: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for line in sys.stdin:
        rows = json.loads(line)["rows"]
        if rows not in tensors:
            # The same inputs in every process: seeded by the row count.
            generator = torch.Generator().manual_seed(rows)
            inputs = [
                torch.randn(rows, w.in_features, generator=generator).to(torch.bfloat16)
                for w in weights
            ]
            outputs = [torch.empty(rows, w.out_features, dtype=torch.bfloat16) for w in weights]
            tensors[rows] = (inputs, outputs)
        inputs, outputs = tensors[rows]
        began = time.perf_counter()
        for matmul, x, y in zip(bound, inputs, outputs, strict=True):
            matmul(x, y)
        seconds = time.perf_counter() - began
        digest = hashlib.sha256()
        for y in outputs:
            digest.update(ctypes.string_at(y.data_ptr(), y.numel() * y.element_size()))
        print(json.dumps({"seconds": seconds, "digest": digest.hexdigest()}))
        sys.stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
