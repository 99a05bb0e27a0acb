"""The one-launch folded Adam (excitation_dist.triton_adam, the CUDA path) run on CPU
through Triton's interpreter: torch Adam / AdamW and DeepSpeed's FusedAdam against
one parameter group per expert at lr * phi (no Excitation code), on stacked experts
and on a flat partition with dense gaps, float32 tolerance; the kernel must be what
stepped them."""

import textwrap

from tests.test_rows import run_in_triton_interpreter

CHECK = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import pytest, torch
    from excitation_dist import triton_adam
    from tests import test_fused_adams as t
    from tests.fused_adam_kernel import install_deepspeed_fused_adam

    launches = []
    real_launch = triton_adam.launch
    triton_adam.launch = lambda *a, **k: (launches.append(k["formula"]), real_launch(*a, **k))
    triton_adam.BLOCK = 8  # several chunks per block

    def check(opt_class, options, strategy, formula):
        reference = t._reference(opt_class, options, strategy)
        launches.clear()
        excited, ex, *_ = t._excited(opt_class, options, strategy)
        assert ex.update_path == "folded" and launches == [formula] * t.STEPS, launches
        for (rw, rd), (ew, ed) in zip(reference, excited):
            torch.testing.assert_close(ew, rw, **t.TOL)
            torch.testing.assert_close(ed, rd, **t.TOL)

    check(torch.optim.AdamW, dict(weight_decay=0.1), "zerosum", "torch")
    check(torch.optim.Adam, dict(weight_decay=0.05), "expdiff", "torch")
    check(torch.optim.AdamW, dict(weight_decay=0.1, fused=True), "zerosum", "torch")
    mp = pytest.MonkeyPatch()
    recorder = install_deepspeed_fused_adam(mp)
    from deepspeed.ops.adam import FusedAdam
    for name, options in t.OPTIONS.items():
        check(FusedAdam, options, "zerosum", "fused")
    launches.clear()
    t.test_flat_partition_with_dense_gaps((FusedAdam, recorder))
    assert launches == ["fused"] * t.STEPS, launches
    print("ok")
""")


def test_one_launch_adam_matches_per_expert_learning_rates_in_the_interpreter():
    run_in_triton_interpreter(CHECK, timeout=600)
