"""A pipeline run by 2 ranks under torchrun or composed for one process, the weights of two runs compared, and a
refusal checked: for the cross-package ``train.parallel`` tests.

Run as a script under torchrun (:func:`torchrun_pipelines`), it runs several pipelines
one after the other in one process group, which pays the ranks' start once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from safetensors.torch import load_file
from tiny_settings import TINY

from vats_apps.cli import config_dir, run_pipeline

REPO = Path(__file__).resolve().parents[1]
# (overrides, env, message): train.parallel settings every pipeline refuses naming the key
# (the second with ddp on one process; env WORLD_SIZE=2: a 2-rank torchrun world).
REFUSALS = [
    (["train.parallel=zero3"], {}, r"train.parallel: ParallelConfig.data_parallel='zero3'"),
    (
        ["train.parallel.data_parallel=ddp", "train.parallel.expert_parallel=2"],
        {},
        r"train.parallel: ParallelConfig.expert_parallel=2 .*divisor of the world size 1",
    ),
    ([], {"WORLD_SIZE": "2"}, r"train.parallel.data_parallel='none' with 2 ranks"),
]


def batch_refusal(key: str, size: int) -> tuple[list[str], dict[str, str], str]:
    """The refusal of an odd global batch ``key=size`` on 2 ranks, as in :data:`REFUSALS`."""
    overrides = ["train.parallel=ddp", f"{key}={size}"]
    return overrides, {"WORLD_SIZE": "2"}, rf"{key}={size} .*multiple of 2"


def compose_tiny(pipeline: str, tmp_path: Path, *extra: str) -> DictConfig:
    """``pipeline=<pipeline>`` at its tiny settings, caching under ``tmp_path/cache`` and
    writing under ``tmp_path/runs`` as :func:`torchrun_pipeline` does."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"pipeline={pipeline}", *TINY[pipeline], *extra])
    cfg.pipeline.cache_dir = str(tmp_path / "cache")
    cfg.pipeline.out_dir = str(tmp_path / "runs")
    return cfg


def torchrun_pipeline(tmp_path: Path, *overrides: str) -> tuple[str, dict[str, Any]]:
    """``torchrun --nproc-per-node 2 -m vats_apps <overrides>``, one thread per rank, the
    cache under ``tmp_path/cache`` and the result under ``tmp_path/runs``.

    Returns:
        ``(stdout, result)``: what the ranks printed, and rank 0's ``result.json``.
    """
    runs = tmp_path / "runs"
    env = {**os.environ, "VATS_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "vats_apps",
        *overrides,
        f"pipeline.out_dir={runs}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads((runs / "result.json").read_text())["result"]


def torchrun_pipelines(tmp_path: Path, runs: dict[str, list[str]]) -> tuple[str, dict[str, Any]]:
    """``runs`` (name -> the overrides of ``vats_apps``) run one after the other by 2 ranks
    under torchrun in one process group, one thread per rank, with the cache under
    ``tmp_path/cache`` and each result under ``tmp_path/runs/<name>``.

    Returns:
        ``(stdout, results)``: what the ranks printed, and rank 0's result of each run.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        str(Path(__file__).resolve()),
        str(tmp_path),
        json.dumps(runs),
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {
        name: json.loads((tmp_path / "runs" / name / "result.json").read_text())["result"]
        for name in runs
    }
    return done.stdout, results


def _run_under_torchrun(tmp_path: Path, runs: dict[str, list[str]]) -> None:
    """:func:`torchrun_pipelines`' side: every rank runs each pipeline of ``runs``."""
    import torch.distributed as dist

    from vats_apps.pipelines.distributed import quiet_other_ranks

    quiet_other_ranks()
    dist.init_process_group("gloo")  # the pipelines train in it (and leave it up)
    try:
        for name, overrides in runs.items():
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            cfg.pipeline.cache_dir = str(tmp_path / "cache")
            cfg.pipeline.out_dir = str(tmp_path / "runs" / name)
            run_pipeline(cfg)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def assert_same_weights(a: dict[str, Any], b: dict[str, Any], atol: float) -> None:
    """The models two pipeline results cached (``<cache>/model``) hold the same weights."""
    wa, wb = (load_file(Path(r["cache"]) / "model" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


def assert_refused_before_any_work(
    cfg: DictConfig, written: Path, env: dict[str, str], message: str
) -> None:
    """The pipeline ``cfg`` raises ``ValueError`` matching ``message`` with ``env`` set (a
    torchrun world: ``WORLD_SIZE``), and ``written`` (where it writes) stays empty."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with pytest.raises(ValueError, match=message):
            run_pipeline(cfg)
    assert not any(written.iterdir()), "nothing may be written before the error"


if __name__ == "__main__":  # under torchrun_pipelines
    _run_under_torchrun(Path(sys.argv[1]), json.loads(sys.argv[2]))
