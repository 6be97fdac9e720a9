"""specray: distributed speculative decoding on Ray.

The repository root is the ``specray`` package (see ``pyproject.toml``), so the
top-level folders import as ``specray.actors``, ``specray.cluster``,
``specray.deploy`` and ``specray.protos``.
"""

__version__ = "0.1.0"
