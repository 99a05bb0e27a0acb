"""Plain PyTorch backend: single process or DDP, any ``torch.optim`` optimizer.

How an MoE layer takes part (the reference layer
:class:`excitation_dist.models.TopKMoE` does exactly this):

1. it exposes ``num_experts`` (global routed experts) and
   ``excitation_expert_slices()``, yielding :class:`ExpertSlice` s: which
   elements of which parameter belong to which global expert (a whole
   parameter per expert, or one chunk of a stacked ``[E, ...]`` parameter);
2. its ``forward`` calls :func:`report_expert_counts` with the router's
   top-k expert indices (``-1`` or ``processed_mask`` marks capacity-dropped
   assignments, ``token_mask`` excludes padding).

Then::

    excitation = excitation_dist.torch.attach(model, optimizer, {"strategy": "zerosum"})
    for batch in data:
        loss(model(batch)).backward()
        optimizer.step()          # counts reduced once, expert updates scaled
        optimizer.zero_grad()
"""

from excitation_dist.torch.backend import ExcitableMoE, ExpertSlice, attach, detach, report_expert_counts

__all__ = ["attach", "detach", "report_expert_counts", "ExpertSlice", "ExcitableMoE"]
