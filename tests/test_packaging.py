"""Installation facts, checked with pip itself and no network.

pyproject.toml states the torch range the code supports and constraints/ the exact versions the
tests run on. Installing excitation-dist where a torch in that range already is (NVIDIA's
containers) must leave that torch alone. Each check builds the project's wheel from the real
pyproject.toml, makes a virtual environment whose installed distributions are metadata-only
stand-ins (a torch of another version, the other dependencies), offers pip a wheelhouse that
holds a torch 2.13.0 it could take, and reads pip's ``--dry-run --report``: what pip would install.
"""

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ROOT / "constraints" / "frameworks.txt"
NVIDIA_TORCH = "2.7.0a0+79aa17489c.nv25.04"  # how NVIDIA's containers version their torch builds


def _requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _pins(path: Path, python_version: str) -> dict[str, str]:
    """``name -> version`` of the ``==`` lines whose marker holds on ``python_version``."""
    env = {"python_version": python_version, "python_full_version": python_version + ".0"}
    pins = {}
    for req in _requirements(path):
        if req.marker is None or req.marker.evaluate(env):
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {req} is not an exact version"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _project_requirements(*extras: str) -> list[Requirement]:
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def _write_wheel(wheelhouse: Path, name: str, version: str) -> None:
    """A metadata-only wheel (what pip needs to resolve and report it)."""
    dist_info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheelhouse / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist_info}/RECORD", "")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """The project's wheel built from the repository's pyproject.toml (its metadata is what
    ``pip install excitation-dist`` reads), and a torch 2.13.0 that pip could take."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, wheels = tmp / "src", tmp / "wheels"
    (src / "excitation_dist").mkdir(parents=True)
    wheels.mkdir()
    for name in ("pyproject.toml", "README.md", "excitation_dist/__init__.py"):
        (src / name).write_text((ROOT / name).read_text())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(wheels), str(src)], env=_pip_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _write_wheel(wheels, "torch", "2.13.0")
    return wheels


def _pip_env() -> dict[str, str]:
    """No pip configuration from this machine (its find-links, indexes, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _environment(tmp_path: Path, installed: dict[str, str]) -> Path:
    """A virtual environment (no pip inside) whose site-packages holds metadata-only
    distributions ``name -> version``, as ``pip install`` would have left them."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    for name, version in installed.items():
        dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (dist_info / "INSTALLER").write_text("pip\n")
        (dist_info / "RECORD").write_text("")
    return venv / "bin" / "python"


def _would_install(python: Path, wheelhouse: Path, requirement: str, *pip_args: str) -> list[str]:
    report = python.parent.parent / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index",
                           "--find-links", str(wheelhouse), "--report", str(report), "-q", *pip_args, requirement],
                          env=_pip_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(canonicalize_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"])


def _installed_dependencies(torch_version: str, *extras: str) -> dict[str, str]:
    """Every requirement of the package (and ``extras``) at its version in this test environment
    (the tested one), torch at ``torch_version``."""
    deps = {canonicalize_name(r.name): metadata.version(r.name) for r in _project_requirements(*extras)}
    deps["torch"] = torch_version
    return deps


def test_tested_versions_lie_inside_the_supported_ranges():
    ranges = {canonicalize_name(r.name): r.specifier for r in _project_requirements(*_project()["optional-dependencies"])}
    torch_spec = ranges["torch"]
    assert not any(s.operator == "==" for s in torch_spec), f"torch is pinned in pyproject.toml: {torch_spec}"
    for python_version in ("3.11", "3.12"):
        pins = _pins(FRAMEWORKS, python_version)
        assert {"torch", "deepspeed", "megatron-core", "transformers", "wandb"} <= set(pins)
        for name, version in pins.items():
            assert ranges[name].contains(version, prereleases=True), f"{name}=={version} outside pyproject's {ranges[name]}"
    assert _pins(FRAMEWORKS, "3.11")["megatron-core"] == "0.16.1" and _pins(FRAMEWORKS, "3.12")["megatron-core"] == "0.19.2"
    assert torch_spec.contains(NVIDIA_TORCH, prereleases=True)  # NVIDIA's 2.7 build is a 2.7
    assert not torch_spec.contains("2.6.0", prereleases=True)  # AdamW there is not Adam(decoupled_weight_decay)


def test_the_tested_environment_is_what_this_venv_runs():
    """constraints/ pins what the tests here run on (torch's local +cpu aside)."""
    for name, version in _pins(FRAMEWORKS, f"{sys.version_info.major}.{sys.version_info.minor}").items():
        assert metadata.version(name).split("+")[0] == version, name
    environment = (ROOT / "constraints" / "environment.txt").read_text()
    assert "-c frameworks.txt" in environment
    assert _pins(ROOT / "constraints" / "environment.txt", "3.11")["numpy"] == metadata.version("numpy")


@pytest.mark.parametrize("torch_version", ["2.99.0", NVIDIA_TORCH])
def test_installing_into_an_environment_with_another_torch_installs_no_torch(tmp_path, wheelhouse, torch_version):
    python = _environment(tmp_path, _installed_dependencies(torch_version))
    assert _would_install(python, wheelhouse, "excitation-dist") == ["excitation-dist"]


def test_control_a_torch_outside_the_range_is_replaced(tmp_path, wheelhouse):
    """The check above can fail: with a torch the code does not support, pip takes the offered one."""
    python = _environment(tmp_path, _installed_dependencies("2.6.0"))
    assert _would_install(python, wheelhouse, "excitation-dist") == ["excitation-dist", "torch"]


def test_the_dockerfile_install_keeps_the_container_torch(tmp_path, wheelhouse):
    """docker/Dockerfile's resolution: the frameworks at the tested versions, less torch;
    with the torch line kept pip would replace the container's torch."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "grep -v '^torch==' constraints/frameworks.txt > /tmp/frameworks-but-torch.txt" in dockerfile
    install = re.search(r"pip install -c /tmp/frameworks-but-torch.txt -e '\.\[([a-z,]+)\]'", dockerfile)
    extras = install.group(1).split(",")
    assert {"deepspeed", "megatron"} <= set(extras)

    but_torch = tmp_path / "frameworks-but-torch.txt"
    but_torch.write_text("".join(line + "\n" for line in FRAMEWORKS.read_text().splitlines()
                                 if not line.startswith("torch==")))
    pins = _pins(FRAMEWORKS, f"{sys.version_info.major}.{sys.version_info.minor}")
    container = _installed_dependencies(NVIDIA_TORCH, *extras)
    container.update({name: pins[name] for name in ("deepspeed", "megatron-core")})
    python = _environment(tmp_path, container)
    target = f"excitation-dist[{','.join(extras)}]"
    assert _would_install(python, wheelhouse, target, "-c", str(but_torch)) == ["excitation-dist"]
    assert _would_install(python, wheelhouse, target, "-c", str(FRAMEWORKS)) == ["excitation-dist", "torch"]


def _apex_requirements(text: str) -> list[str]:
    return re.findall(r"(?m)^\s*[\"']?apex\b.*$|pip install[^\n]*\bapex\b", text)


def test_nothing_installs_pypi_apex_and_apex_imports_are_optional():
    """NVIDIA's apex comes with NVIDIA's containers; PyPI's `apex` is an unrelated project."""
    every = _project_requirements(*_project()["optional-dependencies"])
    assert "apex" not in {canonicalize_name(r.name) for r in every}
    for path in (FRAMEWORKS, ROOT / "constraints" / "environment.txt", ROOT / "docker" / "Dockerfile", ROOT / "Makefile"):
        assert not _apex_requirements(path.read_text()), path
    for path in (ROOT / "excitation_dist").rglob("*.py"):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    or isinstance(h.type, ast.Tuple) and any(getattr(e, "id", "") in ("ImportError", "ModuleNotFoundError")
                                                             for e in h.type.elts)
                    for h in node.handlers):
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "apex" or n.startswith("apex.") for n in names):
                assert id(node) in guarded, f"{path.relative_to(ROOT)}:{node.lineno} imports apex outside try/except ImportError"
