"""The Dockerfile installs the framework versions the project pins (no Docker engine here)."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(requirements):
    pins = {}
    for req in requirements:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([0-9][^;\s]*)\s*(?:;\s*(.*))?$", req)
        if m and (m.group(3) is None or ">= '3.12'" in m.group(3) or '>= "3.12"' in m.group(3)):
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_dockerfile_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = _pins(extras["deepspeed"] + extras["megatron"])
    assert set(wanted) == {"deepspeed", "megatron-core"}
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    found = {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)==([0-9][^"]*)"', dockerfile)}
    for name, version in wanted.items():
        assert found.get(name) == version, f"Dockerfile pins {name}=={found.get(name)}, pyproject {version}"


def test_dockerfile_base_is_pinned_nvidia_pytorch_and_keeps_its_torch():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    tag = re.search(r"ARG BASE_TAG=(\S+)", dockerfile).group(1)
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), tag
    assert "FROM nvcr.io/nvidia/pytorch:${BASE_TAG}" in dockerfile
    assert "pip install --no-deps -e ." in dockerfile  # never replaces the container's CUDA torch
    assert not re.search(r"pip install[^\n]*\bapex\b", dockerfile)  # NVIDIA apex comes with the base image
    for path in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        if path not in ("pyproject.toml",):
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which the repository lacks"
