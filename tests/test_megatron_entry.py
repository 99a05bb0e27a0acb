"""``python -m excitation_dist.recipe.pretrain_gpt`` with a megatron-core that has
no Megatron-LM training loop stops before anything else (the CPU patches
included) and says which megatron-core it needs and how to get it; the CPU
patches refuse other versions the same way. (The working path, run as the
README prints it, is in tests/test_readme.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys
from pathlib import Path
from excitation_dist.recipe import pretrain_gpt
pretrain_gpt.UNPACKED = Path(sys.argv[1])   # as on a checkout where `make megatron-0.19.2` never ran
pretrain_gpt.main(["--num-layers", "2"], cpu=True)
"""


def test_missing_training_loop_names_the_version_and_how_to_get_it(tmp_path):
    pytest.importorskip("megatron.core")
    from excitation_dist.megatron import compat

    if compat.has_training_loop():
        pytest.skip("the installed megatron-core ships megatron.training itself")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "absent")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "PatchVersionError" not in proc.stderr, proc.stderr
    assert f"megatron-core {compat.installed_version()} has no megatron.training" in proc.stderr
    assert "pip install megatron-core==0.19.2" in proc.stderr and "make megatron-0.19.2" in proc.stderr
    assert "CHECKED" not in proc.stderr and "edit" not in proc.stderr


def test_cpu_patch_version_error_says_what_to_install():
    from excitation_dist.megatron import cpu_patches

    common = cpu_patches._load()._common
    with pytest.raises(common.PatchVersionError) as info:
        common.require("example", ("0.0.1",))
    message = str(info.value)
    assert "supports megatron-core 0.0.1" in message and "pip install megatron-core==0.0.1" in message
    assert "CHECKED" not in message


@pytest.mark.parametrize("argv, message", [
    (["--num-layers", "2", "--excitation-stratgy", "zerosum"],
     "pretrain_gpt: unknown flag --excitation-stratgy (did you mean --excitation-strategy?)"),
    (["--excitation-strategy", "bogus"], "pretrain_gpt: excitation.strategy: must be one of"),
    (["--excitation-strategy", "zerosum", "--excitation-gamma", "x"], "pretrain_gpt: argument --excitation-gamma: invalid float value: 'x'"),
])
def test_excitation_flags_are_checked_before_megatron_parses_its_own(argv, message, capsys):
    """One line, with the fix, before Megatron prints its whole usage on every rank."""
    from excitation_dist.recipe.pretrain_gpt import main

    with pytest.raises(SystemExit) as exit_:
        main(argv, cpu=True)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cpu_run_names_its_fallbacks_including_gpu_only_flags():
    from excitation_dist.recipe.pretrain_gpt import cpu_fallbacks

    names = [name for name, _ in cpu_fallbacks(["--num-layers", "2", "--moe-grouped-gemm"])]
    assert "--moe-grouped-gemm" in names and "--transformer-impl local" in names
    assert "--moe-grouped-gemm" not in [name for name, _ in cpu_fallbacks(["--num-layers", "2"])]
