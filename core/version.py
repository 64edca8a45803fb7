"""The project's version as installed (agents put it in every report, the plugin prints it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "retransmit-operator"


def package_version() -> str:
    """The installed distribution's version; "unknown" when running from a tree that is not installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
