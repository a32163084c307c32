"""Sharded (torch.distributed.checkpoint) training checkpoints on one process: exact
resume, complete-or-absent writes, refusal of another model's checkpoint, export.
(Resuming them on another world size is in test_data_parallel.py.)"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from vats_core.parallel import sharded
from vats_core.parallel.sharded import export_pretrained
from vats_core.training import Trainer


def _trainer(sc: ModuleType, out_dir: Path, model: Any = None, **overrides: Any) -> Trainer:
    config = sc.trainer_config(out_dir, checkpoint_every=2, sharded_checkpoints=True, **overrides)
    return Trainer(
        model if model is not None else sc.make_model(),
        config,
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
    )


def test_a_resumed_sharded_run_equals_the_uninterrupted_one_bit_for_bit(
    sc: ModuleType, tmp_path: Path
) -> None:
    whole = _trainer(sc, tmp_path / "whole")
    want = whole.fit()
    _trainer(sc, tmp_path / "split").fit(stop_after=2)
    step = tmp_path / "split" / "checkpoints" / "step_00000002"
    assert {".metadata", "__0_0.distcp"} <= {p.name for p in (step / "sharded").iterdir()}
    resumed = _trainer(sc, tmp_path / "split")
    got = resumed.fit(resume=True)
    assert [r["loss"] for r in got] == [r["loss"] for r in want[2:]]
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    # the optimizer's moments came back too (a fresh AdamW would have diverged above)
    assert resumed.optimizer.state_dict()["state"][0]["step"].item() == 4


def test_a_failed_write_leaves_the_last_complete_checkpoint(
    sc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _trainer(sc, tmp_path).fit(stop_after=2)
    root = tmp_path / "checkpoints"

    def crash(directory: Path, model: Any, optimizer: Any) -> None:
        (directory / "sharded").mkdir()
        (directory / "sharded" / "__0_0.distcp").write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(sharded, "save_sharded", crash)
    with pytest.raises(OSError, match="disk full"):
        _trainer(sc, tmp_path).fit(resume=True)
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no debris
    monkeypatch.undo()
    (root / ".tmp-step_00000004").mkdir()  # debris of a process killed mid-write
    (root / ".tmp-step_00000004" / "junk").write_text("x")
    rows = _trainer(sc, tmp_path).fit(resume=True)
    assert [r["step"] for r in rows] == [3, 4]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert not (root / ".tmp-step_00000004").exists()


def test_another_model_configs_checkpoint_is_refused_before_loading(
    sc: ModuleType, tmp_path: Path
) -> None:
    _trainer(sc, tmp_path).fit(stop_after=2)
    other = sc.make_model(dim=8)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"do not fit TinyTransformer.*shape mismatch"):
        _trainer(sc, tmp_path, model=other).fit(resume=True)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    step = tmp_path / "checkpoints" / "step_00000002"
    with pytest.raises(ValueError, match="do not fit"):
        export_pretrained(step, sc.make_model(dim=8), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_pretrained_writes_the_checkpoints_weights(sc: ModuleType, tmp_path: Path) -> None:
    trainer = _trainer(sc, tmp_path)
    trainer.fit(stop_after=2)
    path = export_pretrained(
        tmp_path / "checkpoints" / "step_00000002", sc.make_model(), tmp_path / "export"
    )
    loaded = sc.TinyTransformer.from_pretrained(path)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert not torch.equal(loaded.head.weight, sc.make_model().head.weight)  # it trained
