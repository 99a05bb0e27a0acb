"""Per-rank memory (RSS) while the recipe trains on a large token file vs a small one.

The recipe reads its samples through megatron-core's dataset stack with the tokens
memory-mapped (``excitation_dist.recipe.data.TokenSource``): a rank's resident memory
must not grow with the corpus. This writes two synthetic Megatron indexed datasets
(random token ids, documents of 200 to 4,000 tokens, through megatron-core's
``IndexedDatasetBuilder``) under a temporary directory, one of ``--large-gb`` and one of
``--small-mb`` of tokens, trains the same tiny run on each (``excitation-dist train``,
backend torch, 2 CPU processes), and reads every rank's RSS from ``/proc`` while it
trains (from its first logged step to its exit), plus its high-water mark (VmHWM) over
the whole run (dataset index building included). Linux only. Nothing is kept: the
temporary directory is removed at the end.

    python benchmarks/data_rss.py                      # 2 GB vs 20 MB (about 4 min on 2 CPU cores)
    python benchmarks/data_rss.py --large-gb 0.1 --steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_cpu_torch.yaml"
VOCAB = 1024  # token ids 1..1023; 0 ends a document
LIMIT_MB = 100.0


def write_tokenizer(directory: Path) -> Path:
    """A word-level Hugging Face tokenizer of VOCAB tokens (the run only needs its
    vocabulary size and end-of-document id)."""
    from tokenizers import Tokenizer, models

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    Tokenizer(models.WordLevel(vocab, unk_token="t1")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    return directory


def write_corpus(prefix: Path, tokens: int, seed: int) -> tuple[int, int]:
    """A Megatron indexed dataset of about ``tokens`` uint16 tokens; (documents, tokens)."""
    from excitation_dist.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    written = documents = 0
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        while written < tokens:
            lengths = rng.integers(200, 4000, size=4096)
            block = rng.integers(1, VOCAB, size=int(lengths.sum()), dtype=np.uint16)
            ends = np.cumsum(lengths)
            block[ends - 1] = 0
            for doc in np.split(block, ends[:-1]):
                writer.add_document(doc)
                written += doc.size
                documents += 1
                if written >= tokens:
                    break
    return documents, written


def _rank_pids(root_pid: int) -> dict[int, int]:
    """{pid: rank} of the processes under ``root_pid`` that torchrun started as ranks."""
    out, stack = {}, [root_pid]
    while stack:
        pid = stack.pop()
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"LOCAL_RANK" in env and b"TORCHELASTIC_RUN_ID" in env and pid != root_pid:
            out[pid] = int(env[b"RANK"])
    return out


def _status_kb(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler(threading.Thread):
    """Every ``interval`` s: each rank's RSS (kept once ``training`` is set) and its VmHWM."""

    def __init__(self, root_pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.training = threading.Event()
        self.done = threading.Event()
        self.rss: dict[int, list[int]] = {}
        self.anon: dict[int, list[int]] = {}
        self.hwm: dict[int, int] = {}

    def run(self) -> None:
        ranks: dict[int, int] = {}
        while not self.done.is_set():
            if len(ranks) < 2:
                ranks.update(_rank_pids(self.root_pid))
            for pid, rank in ranks.items():
                hwm = _status_kb(pid, "VmHWM")
                if hwm is not None:
                    self.hwm[rank] = max(self.hwm.get(rank, 0), hwm)
                if self.training.is_set():
                    rss, anon = _status_kb(pid, "VmRSS"), _status_kb(pid, "RssAnon")
                    if rss is not None and anon is not None:
                        self.rss.setdefault(rank, []).append(rss)
                        self.anon.setdefault(rank, []).append(anon)
            time.sleep(self.interval)


def train(prefix: Path, tokenizer: Path, work: Path, steps: int, seq_length: int) -> dict:
    """Train the tiny run on ``prefix``; per rank: peak and median RSS while training, VmHWM (MB)."""
    args = [sys.executable, "-m", "excitation_dist.cli", "train", str(CONFIG), f"data.path={prefix}",
            f"data.tokenizer={tokenizer}", "model.vocab_size=auto", f"model.seq_length={seq_length}",
            f"schedule.train_steps={steps}", "schedule.warmup_steps=2", "schedule.eval_interval=0",
            "logging.interval=1", f"logging.dir={work / 'log'}", f"data.cache_dir={work / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = RssSampler(proc.pid)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.lstrip().startswith("step ") and "| loss" in line:
            sampler.training.set()
    proc.wait()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"training on {prefix} failed ({proc.returncode}):\n{''.join(lines[-40:])}")
    if not sampler.rss:
        raise SystemExit(f"no rank process was seen while training on {prefix}:\n{''.join(lines[-20:])}")
    return {rank: {"peak": max(v) / 1024, "median": float(np.median(v)) / 1024, "samples": len(v),
                   "anon": max(sampler.anon[rank]) / 1024, "hwm": sampler.hwm.get(rank, 0) / 1024}
            for rank, v in sorted(sampler.rss.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-gb", type=float, default=2.0, help="token bytes of the large corpus (uint16)")
    parser.add_argument("--small-mb", type=float, default=20.0, help="token bytes of the small corpus")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--tmp-dir", help="where the synthetic corpora go (default: the system's temp dir)")
    args = parser.parse_args()
    print("$ python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"backend torch, 2 processes, seq_length {args.seq_length}, {args.steps} steps of 16 samples",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix="data_rss_", dir=args.tmp_dir))
    try:
        tokenizer = write_tokenizer(work / "tokenizer")
        results = {}
        for name, nbytes, seed in (("small", args.small_mb * 1e6, 1), ("large", args.large_gb * 1e9, 2)):
            start = time.perf_counter()
            prefix = work / name / "corpus"
            documents, tokens = write_corpus(prefix, int(nbytes) // 2, seed)
            size = Path(f"{prefix}.bin").stat().st_size
            print(f"{name}: wrote {size / 1e6:,.0f} MB ({tokens:,} tokens, {documents:,} documents) in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            start = time.perf_counter()
            results[name] = train(prefix, tokenizer, work / name, args.steps, args.seq_length)
            print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
            shutil.rmtree(work / name)  # the large corpus is not needed any more
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print("RSS per rank, MB, read from /proc every 0.1 s while training (from the first logged step): peak, median,")
    print("peak of its anonymous part (RssAnon: the rest is mapped file pages), and VmHWM over the whole run")
    print(f"{'rank':>4} | {'small peak':>10} {'median':>7} {'anon':>7} {'HWM':>7} | {'large peak':>10} {'median':>7} "
          f"{'anon':>7} {'HWM':>7} | {'peak diff':>9} {'anon diff':>9} {'HWM diff':>8}")
    worst = 0.0
    for rank in sorted(results["small"]):
        s, l = results["small"][rank], results["large"][rank]
        diff, hwm_diff = l["peak"] - s["peak"], l["hwm"] - s["hwm"]
        worst = max(worst, diff, hwm_diff)
        print(f"{rank:>4} | {s['peak']:>10.1f} {s['median']:>7.1f} {s['anon']:>7.1f} {s['hwm']:>7.1f} | "
              f"{l['peak']:>10.1f} {l['median']:>7.1f} {l['anon']:>7.1f} {l['hwm']:>7.1f} | {diff:>+9.1f} "
              f"{l['anon'] - s['anon']:>+9.1f} {hwm_diff:>+8.1f}")
    verdict = "PASS" if worst <= LIMIT_MB else "FAIL"
    print(f"{verdict}: the large corpus adds at most {worst:+.1f} MB to a rank's peak RSS or high-water mark "
          f"(limit {LIMIT_MB:.0f} MB)")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
