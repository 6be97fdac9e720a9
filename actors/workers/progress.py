"""How a worker shows that a long call is computing: a count of the leaf
modules (projections, norms, attention) its models have run, at a grain much
finer than a whole layer. The cluster's liveness checks read it beside a
running call, so a long prefill or catch-up on a slow machine is told apart
from a hang without a deadline on the call itself."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


class ForwardCount:
    """Leaf-module forwards of ``models`` since construction."""

    def __init__(self, models: Iterable[nn.Module]) -> None:
        self.count = 0
        for model in models:
            for module in model.modules():
                if not any(module.children()):
                    module.register_forward_hook(self._step)

    def _step(self, *_: object) -> None:
        self.count += 1
