"""The trainer: exact resume (in a new process too), accumulation, clipping, NaN handling,
metrics, checkpoints, and the compiled step."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from vats_core.checkpoint import PretrainedMixin, load_safetensors
from vats_core.config import Config
from vats_core.training import (
    NonFiniteLossError,
    TensorBatches,
    Trainer,
    TrainerConfig,
    build_optimizer,
    iter_metrics,
    lr_at,
)
from vats_core.training import trainer as trainer_module


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLPConfig(Config):
    dim: int = 6
    hidden: int = 16
    dropout: float = 0.2


class MLP(PretrainedMixin, nn.Module):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.net = nn.Sequential(
            nn.Linear(config.dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model(seed: int, dropout: float = 0.2, dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPConfig(dropout=dropout)).to(dtype)


def random_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
    """Depends on the position and draws from the global torch and python RNGs: only an
    exact restore of the data position and of both RNGs reproduces it."""
    x = torch.randn(8, 6)
    noise = random.random()
    y = x.sum(-1, keepdim=True) + noise + 0.1 * step - 0.05 * micro
    return {"x": x, "y": y}


def mse_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    pred = model(batch["x"])
    return F.mse_loss(pred, batch["y"]), {"pred_mean": pred.mean()}


def config(tmp: Path, **overrides: Any) -> TrainerConfig:
    base: dict[str, Any] = dict(
        max_steps=12,
        lr=1e-2,
        min_lr_ratio=0.1,
        warmup_steps=3,
        weight_decay=0.1,
        grad_clip=0.5,
        grad_accum_steps=2,
        checkpoint_every=4,
        keep_checkpoints=2,
        log_every=1,
        out_dir=str(tmp),
        seed=123,
        progress=False,
    )
    base.update(overrides)
    return TrainerConfig(**base)


def losses(out_dir: Path) -> list[float]:
    return [row["loss"] for row in iter_metrics(out_dir / "metrics.jsonl")]


def test_stop_and_resume_reproduces_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    full_model = make_model(0)
    full = Trainer(full_model, config(tmp_path / "full"), data=random_batch, loss_fn=mse_loss)
    full_rows = full.fit()
    assert [r["step"] for r in full_rows] == list(range(1, 13))
    # The features the resume must get right are really active in this run.
    assert any(r["grad_norm"] > 0.5 for r in full_rows)  # clipping changes the update
    assert [r["lr"] for r in full_rows] == [
        lr_at(s, config(tmp_path)) for s in range(12)
    ]  # warmup then cosine
    assert len(set(losses(tmp_path / "full"))) == 12

    # First job: stop after 5 steps (checkpoints at 4 and at the stop).
    part = Trainer(make_model(0), config(tmp_path / "part"), data=random_batch, loss_fn=mse_loss)
    part.fit(stop_after=5)
    assert part.step == 5
    # Second job: a model with other weights and scrambled RNGs; resume must restore all.
    torch.manual_seed(999)
    random.seed(999)
    resumed_model = make_model(seed=7)
    resumed = Trainer(resumed_model, config(tmp_path / "part"), data=random_batch, loss_fn=mse_loss)
    rows = resumed.fit(resume=True)
    assert [r["step"] for r in rows] == list(range(6, 13))

    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bitwise equal floats
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resume_after_a_crash_mid_step(tmp_path: Path) -> None:
    """A crash inside step 7 (after one micro-batch) resumes from the step-4 checkpoint."""
    reference = Trainer(
        make_model(0), config(tmp_path / "ref"), data=random_batch, loss_fn=mse_loss
    )
    reference.fit()

    def crashing(step: int, micro: int) -> dict[str, torch.Tensor]:
        if (step, micro) == (6, 1):
            raise KeyboardInterrupt  # the job is killed
        return random_batch(step, micro)

    crashed = Trainer(make_model(0), config(tmp_path / "run"), data=crashing, loss_fn=mse_loss)
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert len(losses(tmp_path / "run")) == 6  # steps 5 and 6 logged after the checkpoint
    resumed = Trainer(make_model(3), config(tmp_path / "run"), data=random_batch, loss_fn=mse_loss)
    resumed.fit(resume=True)
    # metrics.jsonl holds each step once: the rows the dead job wrote after step 4 are redone.
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_grad_accumulation_equals_one_step_on_the_concatenated_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    b1 = {"x": torch.randn(4, 6, dtype=torch.float64), "y": torch.randn(4, 1, dtype=torch.float64)}
    b2 = {"x": torch.randn(4, 6, dtype=torch.float64), "y": torch.randn(4, 1, dtype=torch.float64)}
    both = {k: torch.cat([b1[k], b2[k]]) for k in b1}
    common = dict(max_steps=3, warmup_steps=1, checkpoint_every=0, log_every=1)

    accumulated = make_model(0, dropout=0.0, dtype=torch.float64)
    rows_acc = Trainer(
        accumulated,
        config(tmp_path / "a", grad_accum_steps=2, **common),
        data=lambda step, micro: (b1, b2)[micro],
        loss_fn=mse_loss,
    ).fit()
    single = make_model(0, dropout=0.0, dtype=torch.float64)
    rows_one = Trainer(
        single,
        config(tmp_path / "b", grad_accum_steps=1, **common),
        data=lambda step, micro: both,
        loss_fn=mse_loss,
    ).fit()
    for r_acc, r_one in zip(rows_acc, rows_one, strict=True):
        assert r_acc["loss"] == pytest.approx(r_one["loss"], rel=1e-12)
        assert r_acc["grad_norm"] == pytest.approx(r_one["grad_norm"], rel=1e-10)
        assert r_acc["pred_mean"] == pytest.approx(r_one["pred_mean"], rel=1e-10)
        assert r_acc["throughput_unit"] == "samples/s"
    for a, b in zip(accumulated.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradients_are_clipped_before_the_step(tmp_path: Path) -> None:
    model = make_model(0)
    trainer = Trainer(
        model,
        config(tmp_path, max_steps=4, checkpoint_every=0, grad_clip=0.05),
        data=random_batch,
        loss_fn=mse_loss,
    )
    seen: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))

    trainer.optimizer.register_step_pre_hook(record)
    rows = trainer.fit()
    assert all(r["grad_norm"] > 0.05 for r in rows)  # the raw norms are above the limit
    assert seen == pytest.approx([0.05] * 4, rel=1e-5)  # the optimizer saw clipped ones


def test_non_finite_loss_raises_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    def poisoned(step: int, micro: int) -> dict[str, torch.Tensor]:
        batch = random_batch(step, micro)
        if step == 6:  # the 7th optimizer step
            batch["y"] = batch["y"] * float("nan")
        return batch

    cfg = config(tmp_path / "run", checkpoint_every=2, keep_checkpoints=2)
    model = make_model(0)
    trainer = Trainer(model, cfg, data=poisoned, loss_fn=mse_loss)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step 7") as info:
        trainer.fit()
    assert info.value.step == 7
    assert isinstance(info.value, RuntimeError)

    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    # The checkpoint holds exactly the weights of a clean run stopped at step 6, and the
    # in-memory model was not stepped with the NaN gradients either.
    clean = make_model(0)
    Trainer(
        clean, config(tmp_path / "clean", checkpoint_every=2), data=random_batch, loss_fn=mse_loss
    ).fit(stop_after=6)
    saved = load_safetensors(ckpts / "step_00000006" / "model.safetensors")
    for name, tensor in clean.state_dict().items():
        assert torch.equal(saved[name], tensor), name
        assert torch.equal(model.state_dict()[name], tensor), name
    # It loads: as a pretrained model (the trainer wrote config.json) and as a resume point.
    loaded = MLP.from_pretrained(ckpts / "step_00000006")
    assert torch.equal(loaded.net[0].weight, clean.net[0].weight)
    resumed = Trainer(make_model(1), cfg, data=random_batch, loss_fn=mse_loss)
    resumed.fit(resume=True)
    assert resumed.step == 12


def test_metrics_jsonl_has_one_valid_row_per_logged_step(tmp_path: Path) -> None:
    def eval_fn(model: nn.Module) -> dict[str, float]:
        assert not model.training
        x = torch.linspace(-1, 1, 12).reshape(2, 6)
        return {"mse": float(F.mse_loss(model(x), x.sum(-1, keepdim=True)))}

    model = make_model(0)
    trainer = Trainer(
        model,
        config(tmp_path, max_steps=10, log_every=3, eval_every=5, checkpoint_every=0),
        data=random_batch,
        loss_fn=mse_loss,
        eval_fn=eval_fn,
        items_fn=lambda batch: batch["x"].numel(),
        items_name="values",
    )
    trainer.fit()
    assert model.training  # eval mode was undone
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [3, 5, 6, 9, 10]
    for row in rows:
        if row["step"] != 5:
            assert {"loss", "lr", "grad_norm", "throughput", "elapsed", "pred_mean"} <= row.keys()
            assert row["throughput_unit"] == "values/s"
            assert all(math.isfinite(row[k]) and row[k] >= 0 for k in ("throughput", "elapsed"))
        if row["step"] in (5, 10):
            assert math.isfinite(row["eval/mse"])
    assert "loss" not in rows[1]  # step 5 is an eval-only row


def test_keeps_the_newest_checkpoints_and_points_latest_at_the_last(tmp_path: Path) -> None:
    trainer = Trainer(
        make_model(0),
        config(tmp_path, max_steps=9, checkpoint_every=2, keep_checkpoints=2),
        data=random_batch,
        loss_fn=mse_loss,
    )
    trainer.fit()
    ckpts = tmp_path / "checkpoints"
    # Every 2 steps plus the final step 9; only the newest two remain, and no temp dirs.
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000008", "step_00000009"]
    assert (ckpts / "latest").read_text().strip() == "step_00000009"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        trainer.fit()
    # Resuming with settings that change the numbers is allowed but flagged.
    changed = config(tmp_path, max_steps=11, lr=2e-2, checkpoint_every=2, keep_checkpoints=2)
    with pytest.warns(UserWarning, match=r"changed TrainerConfig fields \['lr', 'max_steps'\]"):
        Trainer(make_model(0), changed, data=random_batch, loss_fn=mse_loss).fit(resume=True)


@pytest.mark.parametrize("victim", ["trainer_state.pt", "optimizer.pt", "model.safetensors"])
def test_corrupt_training_checkpoint_is_refused_clearly(tmp_path: Path, victim: str) -> None:
    cfg = config(tmp_path, max_steps=4, warmup_steps=1, checkpoint_every=2)
    Trainer(make_model(0), cfg, data=random_batch, loss_fn=mse_loss).fit()
    path = tmp_path / "checkpoints" / "step_00000004" / victim
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    model = make_model(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, cfg, data=random_batch, loss_fn=mse_loss)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        trainer.fit(resume=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # nothing was half-loaded
    path.unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        trainer.fit(resume=True)


def test_tensor_batches_resume_in_the_middle_of_an_epoch() -> None:
    data = {"x": torch.arange(10).float().unsqueeze(-1), "y": torch.arange(10)}
    source = TensorBatches(data, batch_size=3, seed=5)  # 3 full batches per epoch
    first = [source.next_batch()["y"].tolist() for _ in range(4)]  # crosses into epoch 1
    state = source.state_dict()
    rest = [source.next_batch()["y"].tolist() for _ in range(5)]
    again = TensorBatches(data, batch_size=3, seed=0)  # the state carries the seed
    again.load_state_dict(state)
    assert [again.next_batch()["y"].tolist() for _ in range(5)] == rest
    # Within an epoch every example appears at most once; the next epoch is reshuffled.
    epoch0, epoch1 = first[:3], [first[3], *rest[:2]]
    assert len({i for b in epoch0 for i in b}) == 9 and len({i for b in epoch1 for i in b}) == 9
    assert epoch0 != epoch1
    batch = source.next_batch()
    assert torch.equal(batch["x"].squeeze(-1).long(), batch["y"])  # rows stay aligned


def test_a_resume_that_changes_the_global_batch_is_refused_before_any_step(
    tmp_path: Path,
) -> None:
    data = {"x": torch.randn(40, 6), "y": torch.randn(40, 1)}
    cfg = config(tmp_path, max_steps=2, warmup_steps=1, checkpoint_every=2)
    Trainer(make_model(0), cfg, data=TensorBatches(data, batch_size=4), loss_fn=mse_loss).fit()
    longer = config(tmp_path, max_steps=4, warmup_steps=1, checkpoint_every=2)
    for source, changed, message in [
        (TensorBatches(data, batch_size=8), cfg, r"batch_size=8 .*written with batch_size=4"),
        (
            TensorBatches(data, batch_size=4),
            cfg.replace(grad_accum_steps=4),
            r"TrainerConfig.grad_accum_steps=4 .*written with grad_accum_steps=2",
        ),
    ]:
        trainer = Trainer(make_model(0), changed, data=source, loss_fn=mse_loss)
        with pytest.raises(ValueError, match=message):
            trainer.fit(resume=True)
        assert trainer.step == 0
    # the same global batch resumes
    trainer = Trainer(
        make_model(0), longer, data=TensorBatches(data, batch_size=4), loss_fn=mse_loss
    )
    with pytest.warns(UserWarning, match=r"\['max_steps'\]"):
        assert [r["step"] for r in trainer.fit(resume=True)] == [3, 4]


def test_weight_decay_only_on_matrices(tmp_path: Path) -> None:
    model = make_model(0)
    opt = build_optimizer(model, config(tmp_path))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2}
    assert {p.ndim for p in no_decay["params"]} == {1}


def test_optimizer_is_fused_and_updates_like_the_reference_loop(tmp_path: Path) -> None:
    model, reference = make_model(0, dropout=0.0), make_model(0, dropout=0.0)
    start = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, config(tmp_path))
    assert opt.defaults["fused"]
    # The same groups and hyperparameters, through torch's plain per-parameter loop.
    groups = build_optimizer(reference, config(tmp_path)).param_groups
    hyper = {k: groups[0][k] for k in ("lr", "betas", "eps")}
    ref_opt = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
        **hyper,
        foreach=False,
    )
    for step in range(3):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b, a0 in zip(model.parameters(), reference.parameters(), start, strict=True):
        assert not torch.equal(a, a0)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"TrainerConfig\.warmup_steps=20 is invalid"):
        TrainerConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match=r"TrainerConfig\.grad_clip=0"):
        TrainerConfig(grad_clip=0)
    with pytest.raises(ValueError, match=r"TrainerConfig\.betas"):
        TrainerConfig(betas=(0.9, 1.0))
    trainer = Trainer(
        make_model(0),
        config(tmp_path, max_steps=2, warmup_steps=1),
        data=random_batch,
        loss_fn=lambda model, batch: model(batch["x"]),  # not a scalar
    )
    with pytest.raises(ValueError, match="scalar"):
        trainer.fit()
    with pytest.raises(ValueError, match="BatchSource"):
        Trainer(make_model(0), config(tmp_path), data=[1, 2], loss_fn=mse_loss)  # type: ignore[arg-type]


def test_bf16_autocast_is_ignored_on_cpu_with_a_warning(tmp_path: Path) -> None:
    trainer = Trainer(
        make_model(0),
        config(tmp_path, max_steps=1, warmup_steps=0, bf16_autocast=True, checkpoint_every=0),
        data=random_batch,
        loss_fn=mse_loss,
    )
    with pytest.warns(UserWarning, match="bf16_autocast is ignored on cpu"):
        trainer.fit()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_resume_is_exact(tmp_path: Path) -> None:
    def cuda_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        x = torch.randn(8, 6, device="cuda")  # the CUDA generator must be restored too
        return {"x": x, "y": x.sum(-1, keepdim=True)}

    def run(out: Path, stop: int | None, resume: bool, seed: int) -> None:
        model = make_model(seed).cuda()
        cfg = config(out, bf16_autocast=True)
        Trainer(model, cfg, data=cuda_batch, loss_fn=mse_loss).fit(resume=resume, stop_after=stop)

    run(tmp_path / "full", None, False, 0)
    run(tmp_path / "part", 5, False, 0)
    run(tmp_path / "part", None, True, 4)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


# --------------------------------------------------------------------------- new processes


_RESUME_SCRIPT = """
import importlib.util, sys
from pathlib import Path

import torch

tests_file, out_dir, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
spec = importlib.util.spec_from_file_location("trainer_tests", tests_file)
tests = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = tests  # dataclasses look their module up there
spec.loader.exec_module(tests)
model = tests.make_model(7)  # other weights: the checkpoint must restore them
trainer = tests.Trainer(
    model, tests.config(out_dir), data=tests.random_batch, loss_fn=tests.mse_loss
)
trainer.fit(resume=True)
"""


def test_resume_in_a_new_process_is_exact_with_no_environment_settings(tmp_path: Path) -> None:
    """The second job is a fresh interpreter with no VATS_* variable: nothing a process
    chooses for itself (kernels, seeds, caches) may change the numbers."""
    full_model = make_model(0)
    Trainer(full_model, config(tmp_path / "full"), data=random_batch, loss_fn=mse_loss).fit()
    Trainer(make_model(0), config(tmp_path / "part"), data=random_batch, loss_fn=mse_loss).fit(
        stop_after=5
    )
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VATS_")}
    threads = torch.get_num_threads()
    env["OMP_NUM_THREADS"] = str(threads)
    job = subprocess.run(
        [sys.executable, str(script), __file__, str(tmp_path / "part"), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert job.returncode == 0, job.stderr
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    saved = load_safetensors(
        tmp_path / "part" / "checkpoints" / "step_00000012" / "model.safetensors"
    )
    for name, tensor in full_model.state_dict().items():
        assert torch.equal(saved[name], tensor), name


# --------------------------------------------------------------------------- compile


def _eval_mse(model: nn.Module) -> dict[str, float]:
    x = torch.linspace(-1, 1, 12).reshape(2, 6)
    return {"mse": float(F.mse_loss(model(x), x.sum(-1, keepdim=True)))}


def test_compiled_step_compiles_once_and_matches_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aot_eager: dynamo's tracing and guards plus AOTAutograd's backward, without code
    generation. 12 steps of 2 micro-batches (and evaluations between them, which put the
    model in eval mode and back) run on the graph compiled at the first call."""
    backend = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(trainer_module, "_COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    common = dict(checkpoint_every=0, eval_every=4)
    eager_model, compiled_model = make_model(0, dropout=0.0), make_model(0, dropout=0.0)
    eager_rows = Trainer(
        eager_model,
        config(tmp_path / "eager", **common),
        data=random_batch,
        loss_fn=mse_loss,
        eval_fn=_eval_mse,
    ).fit()
    assert backend.frame_count == 0  # compile=False never touches torch.compile
    trainer = Trainer(
        compiled_model,
        config(tmp_path / "compiled", compile=True, **common),
        data=random_batch,
        loss_fn=mse_loss,
        eval_fn=_eval_mse,
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        rows = trainer.fit()
    assert backend.frame_count == 1  # one graph, compiled once for 24 micro-batches
    assert [r["step"] for r in rows] == [r["step"] for r in eager_rows]
    for row, eager_row in zip(rows, eager_rows, strict=True):
        for key in ("loss", "grad_norm", "pred_mean", "eval/mse"):
            if key in eager_row:
                assert row[key] == pytest.approx(eager_row[key], rel=1e-5, abs=1e-7), key
    for a, b in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_run_stops_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    full_model = make_model(0)  # dropout 0.2: the compiled graph draws from the restored RNG
    Trainer(
        full_model, config(tmp_path / "full", compile=True), data=random_batch, loss_fn=mse_loss
    ).fit()
    cfg = config(tmp_path / "part", compile=True)
    Trainer(make_model(0), cfg, data=random_batch, loss_fn=mse_loss).fit(stop_after=5)
    resumed_model = make_model(7)
    Trainer(resumed_model, cfg, data=random_batch, loss_fn=mse_loss).fit(resume=True)
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    for (name, a), b in zip(
        full_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_compiled_step_with_inductor(tmp_path: Path) -> None:
    """The real backend (C++ code generation on CPU, some 10-30 s to compile): the same
    training as eager to float32 rounding, with no recompile after the first step."""
    torch._dynamo.reset()
    common = dict(max_steps=4, warmup_steps=1, checkpoint_every=0)
    eager_model, compiled_model = make_model(0, dropout=0.0), make_model(0, dropout=0.0)
    eager_rows = Trainer(
        eager_model, config(tmp_path / "eager", **common), data=random_batch, loss_fn=mse_loss
    ).fit()
    with torch._dynamo.config.patch(error_on_recompile=True):
        rows = Trainer(
            compiled_model,
            config(tmp_path / "compiled", compile=True, **common),
            data=random_batch,
            loss_fn=mse_loss,
        ).fit()
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in eager_rows], rel=1e-5)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_setting_is_checked_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"TrainerConfig\.compile='yes' is invalid"):
        TrainerConfig(compile="yes")  # type: ignore[arg-type]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "setuptools" else find_spec(name, *args),
    )
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"compile=True .* needs setuptools"):
        Trainer(make_model(0), config(out, compile=True), data=random_batch, loss_fn=mse_loss)
    assert not out.exists()
