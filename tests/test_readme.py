"""README.md and docs/ say what the code does (so that they cannot drift from it).

The commands run as written: the shell block of README's "The training recipe" and
the Megatron-LM block of "Use it from Megatron" are extracted and run in order in a
scratch directory that sees the repository's ``configs/`` (``train`` gets a few
overrides appended that make the model tiny and the run 3 steps long; the rest runs
exactly as printed). The DeepSpeed snippet of "Use it from DeepSpeed" runs on one CPU
process with a tiny ``deepspeed.moe`` model, loader and config defined around it.
The two fresh-machine commands of "Quick start" and the SLURM block of "Launch on a
cluster" are checked without running them (Makefile targets and CI's script; the
scripts, configs and node counts; the scripts themselves run under a local SLURM in
tests/test_launch.py). Every shell block of README.md and docs/*.md must be one of
these, so a new command cannot go untested. Every number of README's results tables
must be on one line of the results file its row cites, and every relative link of
README.md and docs/ must point at a file that exists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process_support import free_port

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {p: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
TINY_TRAIN = ["schedule.train_steps=3", "schedule.warmup_steps=1", "schedule.eval_interval=0", "logging.interval=1",
              "model.hidden_size=32", "model.moe.ffn_hidden_size=32", "model.seq_length=32"]


def section(title: str, text: str = README) -> str:
    """The ``## title`` section of ``text`` (README by default), up to the next ``## ``."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


SHELL = "(?:bash|sh|shell|console|zsh)"


def commands(block: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def _env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}


def _run(words: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(words, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(words)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_training_recipe_block_runs_as_written(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (block,) = blocks(section("The training recipe"), "bash")
    cmds = commands(block)
    assert [c[:2] for c in cmds] == [["excitation-dist", "prepare-data"]] + [["excitation-dist", "train"]] * 4 + [
        ["excitation-dist", "report"]]
    for words in cmds:
        if words[1] == "train" and "--dry-run" not in words:
            words = [*words, *TINY_TRAIN]
        proc = _run(words, tmp_path)
        if words[1] == "train" and "--dry-run" not in words:
            assert "step      3/3 | loss" in proc.stdout, proc.stdout
    assert (tmp_path / "data" / "stdlib_text_document.idx").is_file()
    report = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert report == ["loss.png", "multipliers.png", "utilization.png", "utilization_positivesum.png",
                      "utilization_tiny-cpu-torch.png"]


def test_megatron_lm_command_runs_as_written(tmp_path):
    pytest.importorskip("megatron.core")
    blocks_ = [b for b in blocks(section("Use it from Megatron"), "bash") if "pretrain_gpt" in b]
    (words,) = commands(blocks_[0])
    assert words[0] == "torchrun" and "excitation_dist.recipe.pretrain_gpt" in words
    env_free = {k: v for k, v in _env().items() if k not in ("TORCHDYNAMO_DISABLE", "EXCITATION_MEGATRON_CPU")}
    proc = subprocess.run(words, cwd=tmp_path, env=env_free, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if "make megatron-0.19.2" in out and proc.returncode != 0:
        pytest.skip("megatron-core 0.19.x is not available here (run `make megatron-0.19.2`)")
    assert proc.returncode == 0, out[-6000:]
    iters = int(words[words.index("--train-iters") + 1])
    assert f"iteration        {iters}/       {iters} |" in out, out[-3000:]


DEEPSPEED_SETUP = """
import torch
from excitation_dist.models import GPTMoE, GPTMoEConfig

model = GPTMoE(GPTMoEConfig(vocab_size=64, seq_len=16, d_model=32, n_layers=2, n_heads=2, d_ff=32, num_experts=4,
                            experts="deepspeed", capacity_factor=1.25))
ds_config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1},
             "steps_per_print": 1000}
loader = [torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(i)) for i in range(3)]
save_dir = "ckpt"
"""
DEEPSPEED_CHECK = """
assert excitation.step == 3, excitation.step
assert float(excitation.last_multipliers_LE.max()) > 1.0
import pathlib
assert (pathlib.Path(save_dir) / "latest").is_file()
print("README DeepSpeed snippet: OK")
"""


def test_deepspeed_snippet_runs(tmp_path):
    pytest.importorskip("deepspeed")
    (snippet,) = blocks(section("Use it from DeepSpeed"), "python")
    script = tmp_path / "snippet.py"
    script.write_text(DEEPSPEED_SETUP + snippet + DEEPSPEED_CHECK)
    env = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "README DeepSpeed snippet: OK" in proc.stdout, proc.stdout + proc.stderr[-4000:]


def test_every_shell_block_of_readme_and_docs_is_run_or_checked():
    """A shell block added to README.md or docs/ must be taken up by a test in this file."""
    tested = [blocks(section("Quick start (fresh machine, Python >= 3.10)"), "bash"),
              blocks(section("The training recipe"), "bash"),
              [b for b in blocks(section("Use it from Megatron"), "bash") if "pretrain_gpt" in b],
              blocks(section("Launch on a cluster"), "bash")]
    assert all(len(b) == 1 for b in tested), tested
    tested = [b[0] for b in tested]
    found = [(name, b) for name, text in [("README.md", README), *((p.name, s) for p, s in DOCS.items())]
             for b in blocks(text, SHELL)]
    untested = [f"{name}: {b.splitlines()[0]}" for name, b in found if b not in tested]
    assert not untested, f"shell blocks no test runs or checks (add them to tests/test_readme.py): {untested}"
    assert len(found) == len(tested), found


def test_quick_start_commands_are_the_makefile_targets_ci_runs():
    (block,) = blocks(section("Quick start (fresh machine, Python >= 3.10)"), "bash")
    assert commands(block) == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: ", makefile, flags=re.M) and re.search(r"^test: ", makefile, flags=re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M), ci


def test_slurm_block_names_scripts_and_configs_that_exist_and_agree():
    from excitation_dist.recipe.config import load_run_config

    (block,) = blocks(section("Launch on a cluster"), "bash")
    cmds = commands(block)
    assert [c[0] for c in cmds] == ["sbatch"] * len(cmds) and len(cmds) >= 1
    scripts = set()
    for words in cmds:
        nodes = int(words[words.index("--nodes") + 1])
        script, config, *overrides = words[words.index("--nodes") + 2:]
        scripts.add(script)
        assert (ROOT / script).is_file() and script.startswith("launch/slurm/"), script
        assert "sbatch --nodes" in (ROOT / script).read_text()  # its usage line
        cfg = load_run_config(ROOT / config, overrides)
        assert cfg.parallel.nodes == nodes, f"{config}: parallel.nodes={cfg.parallel.nodes}, sbatch --nodes {nodes}"
    assert scripts == {"launch/slurm/train.sbatch", "launch/slurm/deepspeed.sbatch"}
    launch_tests = (ROOT / "tests" / "test_launch.py").read_text()
    assert all(f"launch/slurm/{Path(s).name}" in launch_tests for s in scripts)


NUMBER = re.compile(r"(?<![\w.])[+-]?\d[\d,]*(?:\.\d+)?")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def _table_rows(text: str) -> list[tuple[list[str], list[str]]]:
    """(header cells, row cells) of every markdown table row in ``text``."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            rows.append((header, cells))
    return rows


def test_readme_results_numbers_are_in_the_results_files_they_cite():
    """Each row of README's results tables cites one results file. Every number of the row (links
    aside) must be in one row of that file, whose setting, method and verdict columns, where the
    README's table has them, say the same; a row without those columns must have its numbers on
    one line of the file."""
    rows = _table_rows(section("Measured results"))
    assert len(rows) >= 8, rows
    cited = set()
    for header, cells in rows:
        row = " | ".join(cells)
        targets = {url.split("#")[0] for _, url in LINK.findall(row) if url.startswith("results/")}
        assert len(targets) == 1, f"a results row must cite one file under results/: {row}"
        (target,) = targets
        cited.add(target)
        text = (ROOT / target).read_text()
        numbers = set(NUMBER.findall(LINK.sub("", row)))
        assert numbers, row
        keys = {k: cells[header.index(k)] for k in ("setting", "method", "verdict") if k in header}
        if keys:
            matches = [c for h, c in _table_rows(text) if numbers <= set(NUMBER.findall(" | ".join(c)))
                       and all(k in h and c[h.index(k)] == v for k, v in keys.items())]
        else:
            matches = [line for line in text.splitlines() if numbers <= set(NUMBER.findall(line))]
        assert matches, f"{target} has no {'row' if keys else 'line'} with all of {sorted(numbers)}" + (
            f" and {keys}" if keys else "") + f" (README row: {row})"
    assert {"results/README.md", "results/overhead/README.md", "results/overhead/step_ops.md"} <= cited


def test_relative_links_of_readme_and_docs_resolve():
    broken = []
    for path, text in [(ROOT / "README.md", README), *DOCS.items()]:
        for _, url in LINK.findall(text):
            if re.match(r"[a-z]+:", url) or url.startswith("#"):
                continue
            if not (path.parent / url.split("#")[0]).exists():
                broken.append(f"{path.relative_to(ROOT)}: {url}")
    assert not broken, broken
