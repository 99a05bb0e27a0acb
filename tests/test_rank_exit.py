"""recipe/rank_exit.py: why a finished rank leaves with os._exit, and that it leaves
the way a normal exit would at the Python level."""

import subprocess
import sys
import textwrap


RANK_SCRIPT = """
import glob, gc, os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
if sys.argv[1] == "ddp":
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
    model(torch.ones(2, 3)).sum().backward()
    del model
dist.destroy_process_group()
gc.collect()
names = [open(f).read().strip() for f in glob.glob("/proc/self/task/*/comm")]
# a file per rank: two ranks printing to one pipe can interleave their lines
with open(os.path.join(sys.argv[2], f"rank{rank}"), "w") as f:
    f.write(str(names.count("pt_gloo_runloop")))
"""


def _worker_threads_left(tmp_path, mode: str) -> list[int]:
    script, counts = tmp_path / "rank.py", tmp_path / mode
    script.write_text(RANK_SCRIPT)
    counts.mkdir()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), mode, str(counts)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return [int((counts / f"rank{rank}").read_text()) for rank in (0, 1)]


def test_a_ddp_wrapped_gloo_group_outlives_its_destroy(tmp_path):
    """The premise of rank_exit: destroy_process_group ends a gloo group's worker threads,
    unless DDP wrapped the group (they keep running into interpreter exit). If this fails,
    torch releases the group again and rank_exit.leave can go."""
    assert _worker_threads_left(tmp_path, "bare") == [0, 0]
    assert all(n > 0 for n in _worker_threads_left(tmp_path, "ddp"))


def test_leave_does_the_python_half_of_an_exit_then_skips_finalization(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from excitation_dist.recipe.rank_exit import leave

        class Finalized:
            def __del__(self):
                print("finalized", flush=True)

        keep = Finalized()  # module global: only interpreter finalization would collect it
        atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, "w").write("ran"))
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
        sys.stdout.write("buffered, no newline")
        leave(3)
        print("after leave")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert "thread finished" in out.stdout and "buffered, no newline" in out.stdout
    assert "after leave" not in out.stdout and "finalized" not in out.stdout
