"""The Dockerfile installs the tested framework versions into NVIDIA's container and keeps its
torch (no Docker engine here; tests/test_packaging.py runs the Dockerfile's pip resolution)."""

import re
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _tested_pins(python_version: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "frameworks.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"python_version": python_version}):
                pins[req.name.lower()] = next(iter(req.specifier)).version
    return pins


def test_dockerfile_installs_the_tested_frameworks_less_torch():
    pins = _tested_pins("3.12")  # NVIDIA's containers run Python 3.12
    assert pins["deepspeed"] == "0.19.8" and pins["megatron-core"] == "0.19.2"
    assert "COPY constraints ./constraints" in DOCKERFILE
    assert "grep -v '^torch==' constraints/frameworks.txt > /tmp/frameworks-but-torch.txt" in DOCKERFILE
    assert re.search(r"pip install -c /tmp/frameworks-but-torch.txt -e '\.\[[a-z,]*deepspeed[a-z,]*\]'", DOCKERFILE)
    assert "megatron" in re.search(r"-e '\.\[([a-z,]+)\]'", DOCKERFILE).group(1).split(",")
    assert "--no-deps" not in DOCKERFILE  # pip resolves everything and finds the container's torch in range
    assert "| cmp - /tmp/torch-before" in DOCKERFILE  # the build fails if torch changed


def test_dockerfile_base_is_a_pinned_nvidia_pytorch_tag_documented_in_the_readmes():
    tag = re.search(r"ARG BASE_TAG=(\S+)", DOCKERFILE).group(1)
    assert re.fullmatch(r"\d\d\.\d\d-py3", tag), tag
    assert "FROM nvcr.io/nvidia/pytorch:${BASE_TAG}" in DOCKERFILE
    for readme in (ROOT / "docker" / "README.md", ROOT / "README.md"):
        assert f"nvcr.io/nvidia/pytorch:{tag}" in readme.read_text(), f"{readme.relative_to(ROOT)} names another tag"
    assert not re.search(r"pip install[^\n]*\bapex\b", DOCKERFILE)  # NVIDIA apex comes with the base image
    for path in re.findall(r"^COPY (\S+) ", DOCKERFILE, flags=re.M):
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which the repository lacks"
