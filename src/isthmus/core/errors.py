"""The small exception tree shared by every layer."""

from __future__ import annotations


class IsthmusError(Exception):
    """Base of every error isthmus raises on purpose."""


class ConfigError(IsthmusError):
    """A configuration value is invalid; the message names the file and the field."""


class TraceError(IsthmusError):
    """A trace or workload file is malformed; the message names the file and the line."""


class RegistryError(IsthmusError):
    """An unknown or duplicate name in a registry, or bad parameters for a registered factory."""


class UnknownProfileError(RegistryError):
    """No performance profile for a (GPU, model) pair."""
