"""One module per framework behind ``excitation-dist train``: ``torch`` (DDP), ``fsdp2`` (FSDP2 + DCP),
``deepspeed`` (a DeepSpeed engine) and ``megatron`` (megatron-core's schedules).

Each builds its model and optimizer from a :class:`~excitation_dist.recipe.config.RunConfig`,
attaches Excitation through its framework's adapter, and exposes ``validate(cfg)``
(raises :class:`~excitation_dist.config.ConfigError` before any process starts)
and ``train(cfg)`` (runs :func:`excitation_dist.recipe.loop.run_training` with a
:class:`~excitation_dist.recipe.loop.TrainBackend`).
"""
