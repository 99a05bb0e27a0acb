"""One version gate for every framework fact this project relies on.

Each adapter states the range of its framework it was checked against as a PEP
440 specifier (``packaging.specifiers.SpecifierSet``); outside it :func:`require`
refuses to run, because a silent change in a framework's internals (a router's
output, an optimizer's shard layout) would make Excitation count or scale the
wrong elements. An environment variable lets a user try another version at
their own risk.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Gate:
    """The range of one framework an adapter was checked against."""

    package: str  # as messages name it
    distribution: str  # the pip distribution whose version is read
    module: str  # the import name, whose ``__version__`` is the fallback without package metadata
    specifier: str
    checked: str  # the exact versions tested
    install: str
    skip_env: str


GATES = {
    "deepspeed": Gate("DeepSpeed", "deepspeed", "deepspeed", ">=0.19.0,<0.20", "0.19.8",
                      "DS_BUILD_OPS=0 pip install deepspeed==0.19.8", "EXCITATION_DEEPSPEED_SKIP_VERSION_CHECK"),
    "megatron-core": Gate("megatron-core", "megatron-core", "megatron.core", ">=0.16.1,<0.20", "0.16.1, 0.19.2",
                          "pip install megatron-core==0.16.1 (Python 3.11) or megatron-core==0.19.2 (Python >= 3.12)",
                          "EXCITATION_MEGATRON_SKIP_VERSION_CHECK"),
    "torchtitan": Gate("torchtitan", "torchtitan", "torchtitan", ">=0.3.0,<0.4", "0.3.0",
                       "pip install 'excitation-dist[torchtitan]'", "EXCITATION_TORCHTITAN_SKIP_VERSION_CHECK"),
}
"""Every framework gate, readable without importing the framework or torch (the command line
checks a run's backend with them before it launches any rank)."""


def installed(name: str) -> str:
    """The installed version of gate ``name``'s framework (its package metadata, else its ``__version__``)."""
    gate = GATES[name]
    try:
        return importlib.metadata.version(gate.distribution)
    except importlib.metadata.PackageNotFoundError:
        return importlib.import_module(gate.module).__version__


def check(name: str, version: str | None = None) -> None:
    """:func:`require` for gate ``name``; ``version`` defaults to :func:`installed`."""
    gate = GATES[name]
    require(gate.package, installed(name) if version is None else version, gate.specifier, checked=gate.checked,
            install=gate.install, skip_env=gate.skip_env)
