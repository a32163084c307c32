"""``python -m vats_apps``: the ``vats`` command, for launchers that start a module
(``torchrun --nproc-per-node 2 -m vats_apps pipeline=text_generation train.parallel=fsdp``)."""

from vats_apps.cli import main

main()
