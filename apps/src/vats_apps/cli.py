"""The ``vats`` command: one Hydra entry point for every pipeline.

``vats pipeline=<name> [overrides...]`` composes ``configs/config.yaml`` with the
chosen ``configs/pipeline/<name>.yaml`` and calls the function the pipeline's
``_target_`` names with the whole composed config. Models never see Hydra: each
pipeline turns its config section into the model's dataclass config.

Under ``torchrun`` (``python -m vats_apps`` is this command) every rank runs the pipeline;
rank 0 alone prints and writes ``result.json`` (see
:mod:`vats_apps.pipelines.distributed`).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.utils import get_method
from omegaconf import DictConfig

from vats_apps.pipelines.distributed import launched_rank, quiet_other_ranks
from vats_apps.pipelines.results import write_result


def config_dir() -> Path:
    """The config tree: shipped inside the wheel, or the repository's ``configs/``."""
    packaged = Path(__file__).parent / "configs"
    if packaged.is_dir():
        return packaged
    repo = Path(__file__).resolve().parents[3] / "configs"
    if repo.is_dir():
        return repo
    raise FileNotFoundError(f"vats config tree not found (looked in {packaged} and {repo})")


def pipeline_name(target: str) -> str:
    """The pipeline's name from its ``_target_``: the module's last part
    (``vats_apps.pipelines.text_to_image.run`` -> ``text_to_image``)."""
    module = target.rpartition(".")[0]
    return module.rpartition(".")[2] or target


def run_pipeline(cfg: DictConfig) -> object:
    """Call the pipeline named by ``cfg.pipeline._target_`` with the composed config.

    When the config has a ``pipeline.out_dir``, what the pipeline returns is also written
    there as ``result.json`` (atomically; see :mod:`vats_apps.pipelines.results`), which
    ``vats pipeline=report`` gathers into one page. A pipeline that raises writes none.
    """
    target = cfg.pipeline.get("_target_")
    if not target:
        raise ValueError("the pipeline config has no _target_: choose one with pipeline=<name>")
    result = get_method(target)(cfg)
    out_dir = cfg.pipeline.get("out_dir")
    if out_dir is not None and launched_rank().is_main:  # under torchrun, rank 0 reports
        path = write_result(str(out_dir), pipeline_name(str(target)), result)
        print(f"result: {path}")
    return result


def main() -> None:
    quiet_other_ranks()  # under torchrun: rank 0 prints, the others train silently
    hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")(
        run_pipeline
    )()
