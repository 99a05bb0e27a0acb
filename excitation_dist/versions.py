"""One version gate for every framework fact this project relies on.

Each adapter states the range of its framework it was checked against as a PEP
440 specifier (``packaging.specifiers.SpecifierSet``); outside it :func:`require`
refuses to run, because a silent change in a framework's internals (a router's
output, an optimizer's shard layout) would make Excitation count or scale the
wrong elements. An environment variable lets a user try another version at
their own risk.
"""

from __future__ import annotations

import os

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


class UnsupportedVersionError(RuntimeError):
    """An installed framework lies outside the range this project checked."""


def in_range(version: str, specifier: str) -> bool:
    """True if ``version`` (a local suffix such as ``+cu130`` ignored) satisfies ``specifier``."""
    try:
        release = Version(version).public
    except InvalidVersion:
        return False
    return SpecifierSet(specifier).contains(release, prereleases=True)


def require(package: str, version: str, specifier: str, *, checked: str, install: str, skip_env: str) -> None:
    """Raise :class:`UnsupportedVersionError` unless ``version`` of ``package`` is in
    ``specifier`` (or ``skip_env`` is set to 1).

    Args:
        checked: the exact versions tested, for the message (e.g. "0.16.1, 0.19.2").
        install: the command that installs a checked version.
        skip_env: environment variable that skips the check.
    """
    if in_range(version, specifier) or os.environ.get(skip_env) == "1":
        return
    raise UnsupportedVersionError(
        f"excitation-dist was checked against {package} {specifier} (tested: {checked}); found {version}. "
        f"Install a checked version: {install}. To try {version} at your own risk (then run the project's "
        f"tests for it), set {skip_env}=1."
    )
