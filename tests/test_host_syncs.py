"""Excitation adds no host sync to a training step, on every backend.

Each test runs the same training step without and with Excitation attached
(the folded update, and the blend path; for the torch backend also a fused
AdamW, folded), under a TorchDispatchMode that
records every op that makes the host wait for a device (``.item()``,
``bool(t)``, value-dependent shapes, device-to-host copies; see
:mod:`excitation_dist.testing.syncs`). The frameworks' own syncs (DeepSpeed's
overflow check, megatron's grad-norm, the toy model's routing loop) appear in
both runs; the difference must be empty. The first step (lazy state
initialization) runs outside the recorder.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from excitation_dist.testing import run_distributed
from excitation_dist.testing.syncs import count_host_syncs


def _added(with_excitation: Counter, without: Counter) -> dict:
    return dict(with_excitation - without)


@pytest.mark.parametrize("update, fused, path", [("auto", False, "folded"), ("blend", False, "blend"),
                                                 ("auto", True, "folded")])
def test_torch_backend_step_adds_no_host_sync(update, fused, path):
    from excitation_dist.models import GPTMoE, GPTMoEConfig
    from excitation_dist.torch import attach

    cfg = GPTMoEConfig(vocab_size=32, seq_len=12, d_model=16, n_layers=2, n_heads=2, d_ff=16, num_experts=4, top_k=2)
    seen = []
    for excited in (False, True):
        torch.manual_seed(0)
        model = GPTMoE(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        ex = attach(model, opt, {"strategy": "zerosum", "update": update}) if excited else None
        for step in range(2):
            tokens = torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(step))
            with count_host_syncs() as syncs:
                for _ in range(2):  # two micro-batches
                    model(tokens).backward()
                opt.step()
                opt.zero_grad()
        seen.append(syncs)
        if ex is not None:
            assert ex.update_path == path and (ex.last_multipliers_LE != 1).any()
    assert seen[1]["_local_scalar_dense"] > 0  # the recorder sees the model's own syncs
    assert _added(seen[1], seen[0]) == {}


def _deepspeed_syncs():
    import excitation_dist.deepspeed as exds
    from tests import deepspeed_support as dc
    from tests.test_deepspeed_backend import _train_step

    dc.setup_deepspeed()
    case = dc.Case("z2-fp32-ep2-top2-ga2", zero=2, ep=2, k=2, gas=2)
    seen = []
    for update in (None, "auto", "blend"):
        engine = dc.build_engine(case, per_expert_lr=False)
        ex = exds.attach(engine, {"strategy": "zerosum", "update": update}) if update else None
        _train_step(engine, case, 0)
        with count_host_syncs() as syncs:
            _train_step(engine, case, 1)
        seen.append(syncs)
        if ex is not None:
            assert ex.update_path == ("folded" if update == "auto" else "blend") and ex.step == 2
    return [_added(s, seen[0]) for s in seen[1:]], sum(seen[0].values())


def test_deepspeed_step_adds_no_host_sync():
    pytest.importorskip("deepspeed")
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    for added, baseline in run_distributed(_deepspeed_syncs, 2, env=env, timeout=300):
        assert baseline > 0 and added == [{}, {}]  # folded, blend


def _megatron_syncs():
    import excitation_dist.megatron as exmeg
    from tests import megatron_support as ms

    case = ms.Case("ep2-a2a-fp32-ga2", ep=2, gas=2)
    seen = []
    for update in (None, "auto", "blend"):
        ms.setup(case)
        chunks, opt = ms.build(case, per_expert_lr=False)
        ex = exmeg.attach(chunks, opt, {"strategy": "zerosum", "update": update}) if update else None
        ms.train_step(chunks, opt, case, 0)
        with count_host_syncs() as syncs:
            ms.train_step(chunks, opt, case, 1)
        seen.append(syncs)
        if ex is not None:
            assert ex.update_path == ("folded" if update == "auto" else "blend") and ex.step == 2
            exmeg.detach(opt)
    return [_added(s, seen[0]) for s in seen[1:]], sum(seen[0].values())


def test_megatron_step_adds_no_host_sync():
    pytest.importorskip("megatron.core")
    from tests.megatron_support import ENV

    for added, baseline in run_distributed(_megatron_syncs, 2, env=ENV, timeout=300):
        assert baseline > 0 and added == [{}, {}]  # folded, blend
