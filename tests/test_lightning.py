"""PyTorch Lightning's automatic optimization (forward and backward inside
``optimizer.step(closure)``), 2 ranks DDP on CPU, gradient accumulation 2.

Reference: one process, the global batch of every step, a plain AdamW, then
the definition old + phi * (stepped - old) on each expert's rows, phi from
tokens counted from the router's logits. Before closures were supported the
excited run scaled each step by the previous step's counts and stepped the
experts twice."""

import pytest
import torch

from excitation_dist.testing import run_distributed

pl = pytest.importorskip("lightning.pytorch")

STEPS, ACCUMULATE, RANKS = 3, 2, 2


def _tokens(micro, rank):
    return torch.randint(0, 32, (2, 13), generator=torch.Generator().manual_seed(1000 * micro + rank))


def _model():
    from tests.test_step_order import CFG
    from excitation_dist.models import GPTMoE, GPTMoEConfig
    torch.manual_seed(0)
    return GPTMoE(GPTMoEConfig(**CFG)).double()


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = _model()

    def training_step(self, batch, batch_idx):
        return self.model(_tokens(int(batch), self.global_rank))

    def configure_optimizers(self):
        return _optimizer(self.parameters())


def _lightning_rank():
    from excitation_dist.lightning import ExcitationCallback

    callback = ExcitationCallback({"strategy": "zerosum"}, log_metrics=False)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if callback.excitation is not None and callback.excitation.step > len(seen):
                seen.append(callback.excitation.last_counts_LE.clone())

    trainer = pl.Trainer(accelerator="cpu", devices=RANKS, strategy="ddp", precision="64-true",
                         max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, use_distributed_sampler=False,
                         callbacks=[callback, Record()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = _Module()
    data = torch.utils.data.DataLoader(torch.arange(STEPS * ACCUMULATE), batch_size=None)
    trainer.fit(module, data)
    # numpy arrays: pickled by value (torch tensors would travel as shared memory the exiting rank closes)
    return {k: v.detach().numpy().copy() for k, v in module.model.state_dict().items()}, [c.numpy() for c in seen]


def test_lightning_ddp_closure_steps_equal_plain_adamw_plus_the_definition():
    from excitation_dist import multipliers
    from tests.test_torch_counting import RouterSpy

    (state0, counts0), (state1, _) = run_distributed(_lightning_rank, RANKS, timeout=240)

    model = _model()
    opt = _optimizer(model.parameters())
    spy = RouterSpy(model)
    experts = [(w, layer) for layer, b in enumerate(model.blocks) for w in (b.ffn.experts.w_in_EDF, b.ffn.experts.w_out_EFD)]
    for step in range(STEPS):
        spy.counts.zero_()
        opt.zero_grad()
        for micro in range(step * ACCUMULATE, (step + 1) * ACCUMULATE):
            for rank in range(RANKS):  # DDP averages ranks, Lightning divides by the accumulation
                (model(_tokens(micro, rank)) / (RANKS * ACCUMULATE)).backward()
        olds = [w.detach().clone() for w, _ in experts]
        opt.step()
        phi_LE = multipliers(spy.counts, "zerosum", 1.0)
        with torch.no_grad():
            for (w, layer), old in zip(experts, olds):
                w.copy_(old + phi_LE[layer].view(-1, 1, 1) * (w - old))
        assert torch.equal(torch.from_numpy(counts0[step]), spy.counts), step  # the step's own tokens, both ranks, both micro-batches
    for name, ref in model.state_dict().items():
        torch.testing.assert_close(torch.from_numpy(state0[name]), ref, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
        assert (state0[name] == state1[name]).all(), name  # replicas identical
