"""Pipelines: each is a function ``run(cfg: DictConfig)`` named by a ``configs/pipeline`` file."""
