"""Self-contained parts the training loop uses, kept apart from the loop as torchtitan keeps ``components/``
apart from its trainer: checkpoints and their conversion to DeepSpeed's universal format (``checkpoint``,
``universal``), fault handling (the rank heartbeat, the preemption flag, the run's outcome and exit codes:
``heartbeat``, ``preemption``, ``outcome``), metrics and their logging (``metrics``, ``logger``) and the
pictures of reconstructions and position embeddings (``pictures``). They may import each other and the
rest of hipscale (model, config, data), but never the loop and its setup in :mod:`hipscale.training`
(trainer, cli, data and model setup, ...), which import them.
"""
