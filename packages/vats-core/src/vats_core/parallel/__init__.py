"""Training on several ranks: parallelism applied to a model from outside, as torchtitan does.

- :class:`ParallelConfig`, :class:`DataParallel`: what to apply (validated config);
- :func:`parallelize`: per-block activation checkpointing, per-block ``torch.compile``,
  then DDP or FSDP2 (``fully_shard`` on every transformer block and the root);
- :func:`check_parallelizable`: parallelize's refusals alone (a model on the meta device
  is enough), to fail before expensive work;
- :func:`transformer_blocks`: the rule that finds a model's blocks;
- :func:`~vats_core.parallel.runtime.gathered_model_state`: a parallelized model's
  weights as one state dict;
- :mod:`vats_core.parallel.runtime`: how the trainer splits batches, averages metrics and
  writes checkpoints on a process group;
- :func:`~vats_core.parallel.router.global_router_losses`: a MoE model's router losses of
  the global batch, from each rank's rows;
- :mod:`vats_core.parallel.sharded`: sharded checkpoints (``torch.distributed.checkpoint``)
  and :func:`~vats_core.parallel.sharded.export_pretrained`.

Model files never import ``torch.distributed``; this package is where it is used. Run a
script under ``torchrun --nproc-per-node N``::

    torch.distributed.init_process_group("gloo")  # "nccl" on GPUs
    torch.manual_seed(0)  # every rank builds the same initial weights
    model = parallelize(MyModel(config), ParallelConfig(data_parallel="fsdp"))
    Trainer(model, trainer_config, data=data, loss_fn=loss_fn).fit()

The heavier ``torch.distributed`` submodules (FSDP, DCP) are imported when they are used,
so a single-process run pays nothing for them.
"""

from vats_core.parallel.apply import check_parallelizable, parallelize, transformer_blocks
from vats_core.parallel.config import DataParallel, ParallelConfig
from vats_core.parallel.router import global_router_losses

__all__ = [
    "DataParallel",
    "ParallelConfig",
    "check_parallelizable",
    "global_router_losses",
    "parallelize",
    "transformer_blocks",
]
