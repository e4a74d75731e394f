"""Fixtures of the engine-double tests (the helpers live in ``emulator_harness``)."""

from emulator_harness import emulator_factory

__all__ = ["emulator_factory"]
