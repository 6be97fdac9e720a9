"""Package discovery for the repository-root package: every folder of
actors/, cluster/, deploy/, bench/ and protos/ with an ``__init__.py`` becomes
``specray.<folder>`` (the metadata is in pyproject.toml)."""

from setuptools import find_packages, setup

TOP_LEVEL = ("actors", "cluster", "deploy", "bench", "protos")

setup(
    package_dir={"specray": "."},
    packages=[
        "specray",
        *(f"specray.{name}" for name in find_packages(include=[f"{t}*" for t in TOP_LEVEL])),
    ],
)
