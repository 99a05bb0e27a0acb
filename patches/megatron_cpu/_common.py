"""Shared helpers of the megatron-core CPU patches: the version gate and the
record of what was applied (so that applying twice is a no-op)."""

from __future__ import annotations

APPLIED: dict[str, str] = {}  # patch name -> megatron-core version it was applied for


class PatchVersionError(RuntimeError):
    """The installed megatron-core is not a version a patch was checked against."""


def megatron_version() -> str:
    from excitation_dist import versions

    return versions.installed("megatron-core")


def require(patch: str, checked: tuple[str, ...]) -> str:
    """Return the installed megatron-core version if ``patch`` was checked
    against it (exact ``major.minor.patch``), else raise naming both."""
    version = megatron_version()
    if version.split("+")[0] not in checked:
        raise PatchVersionError(
            f"the CPU patch {patch!r} (patches/megatron_cpu/) supports megatron-core {' and '.join(checked)}; "
            f"found {version}. Install a supported version: pip install megatron-core=={checked[-1]} "
            f"(Python >= 3.12; on Python 3.11 `make megatron-0.19.2` in the project checkout provides 0.19.2, "
            f"and 0.16.1 installs with pip), or run on a GPU machine, where no CPU patch is applied."
        )
    return version


def mark(patch: str, version: str) -> bool:
    """Record ``patch`` as applied; False if it already was."""
    if patch in APPLIED:
        return False
    APPLIED[patch] = version
    return True


def target(obj: object, name: str, patch: str) -> object:
    """``getattr(obj, name)``, failing loudly if upstream renamed it."""
    if not hasattr(obj, name):
        raise PatchVersionError(f"CPU patch {patch!r}: {getattr(obj, '__name__', obj)!r} has no attribute {name!r}")
    return getattr(obj, name)
