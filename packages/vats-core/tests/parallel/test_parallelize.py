"""parallelize on one process: the config's checks, the block rule, activation
checkpointing and per-block compile (the plain model's numbers), and FSDP / DDP on a
one-rank process group (the plain trainer's numbers)."""

from __future__ import annotations

import contextlib
import copy
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from vats_core.checkpoint import load_safetensors
from vats_core.parallel import ParallelConfig, parallelize, transformer_blocks
from vats_core.parallel import apply as apply_module
from vats_core.training import Trainer

# ----------------------------------------------------------------------------- config


def test_config_round_trips_and_rejects_unknown_values() -> None:
    config = ParallelConfig(data_parallel="fsdp", activation_checkpointing=True)
    assert ParallelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["data_parallel"] == "fsdp"
    with pytest.raises(ValueError, match=r"ParallelConfig.data_parallel='zero3' .*'ddp', 'fsdp'"):
        ParallelConfig(data_parallel="zero3")
    with pytest.raises(ValueError, match=r"ParallelConfig.compile='yes' .*a bool"):
        ParallelConfig(compile="yes")
    with pytest.raises(ValueError, match="no field"):
        ParallelConfig.from_dict({"data_paralel": "ddp"})


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_data_parallel_without_a_process_group_is_refused_before_any_change(
    sc: ModuleType, kind: str
) -> None:
    assert not torch.distributed.is_initialized()
    model = sc.make_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        ValueError, match=rf"ParallelConfig.data_parallel='{kind}'.*no default process group"
    ):
        parallelize(model, ParallelConfig(data_parallel=kind, activation_checkpointing=True))
    assert not any("forward" in vars(block) for block in model.layers)  # nothing applied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("field", ["activation_checkpointing", "compile"])
def test_per_block_options_on_a_model_without_blocks_are_refused(field: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=rf"ParallelConfig.{field}=True .*no transformer blocks"):
        parallelize(model, ParallelConfig(**{field: True}))
    assert parallelize(model, ParallelConfig()) is model  # nothing asked: nothing needed


def test_a_model_is_parallelized_once(sc: ModuleType) -> None:
    model = parallelize(sc.make_model(), ParallelConfig(activation_checkpointing=True))
    with pytest.raises(ValueError, match="already parallelized"):
        parallelize(model, ParallelConfig(activation_checkpointing=True))


def test_parameters_on_several_devices_are_refused(sc: ModuleType) -> None:
    model = sc.make_model()
    model.head.to("meta")
    with pytest.raises(ValueError, match=r"exactly one device.*'cpu', 'meta'"):
        parallelize(model, ParallelConfig(activation_checkpointing=True))


# ----------------------------------------------------------------------------- the block rule


class _Inner(nn.Module):
    """A block holding a list of its own: not searched (a block is one unit)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])


class _Composite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.blocks = nn.ModuleList([_Inner(), _Inner()])
        self.video = nn.Module()
        self.video.spatial_blocks = nn.ModuleList([nn.Linear(2, 2)])
        self.video.temporal_blocks = nn.ModuleList([nn.Linear(2, 2)])
        self.heads = nn.ModuleList([nn.Linear(2, 2)])  # not a block list by name
        self.lm = nn.Module()
        self.lm.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])


def test_transformer_blocks_are_the_elements_of_layers_blocks_and_star_blocks_lists(
    sc: ModuleType,
) -> None:
    model = _Composite()
    want = [
        *model.encoder.blocks,
        *model.video.spatial_blocks,
        *model.video.temporal_blocks,
        *model.lm.layers,
    ]
    assert [id(b) for b in transformer_blocks(model)] == [id(b) for b in want]
    tiny = sc.make_model()
    assert transformer_blocks(tiny) == list(tiny.layers)
    assert transformer_blocks(nn.Linear(2, 2)) == []


# ----------------------------------------------------------------------------- same numbers


def _train(
    sc: ModuleType, model: nn.Module, out_dir: Path, **overrides: Any
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    seen: dict[int, dict[str, torch.Tensor]] = {}
    trainer = Trainer(
        model,
        sc.trainer_config(out_dir, **overrides),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=lambda step, m: seen.__setitem__(step, sc.full_params(m)),
    )
    rows = trainer.fit()
    return seen[max(seen)], rows


def _count_calls(module: nn.Module) -> list[int]:
    """Calls of ``module``, counted as they start (a recomputation stops as soon as it has
    rebuilt the last tensor the backward needs, before the module returns)."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_activation_checkpointing_recomputes_blocks_and_keeps_the_numbers(
    sc: ModuleType, tmp_path: Path
) -> None:
    plain = sc.make_model()
    checkpointed = parallelize(sc.make_model(), ParallelConfig(activation_checkpointing=True))
    assert checkpointed.layers[0].forward.__self__ is checkpointed.layers[0]
    plain_calls = _count_calls(plain.layers[1].ffn)
    ac_calls = _count_calls(checkpointed.layers[1].ffn)
    want, want_rows = _train(sc, plain, tmp_path / "plain")
    got, got_rows = _train(sc, checkpointed, tmp_path / "ac")
    assert ac_calls[0] == 2 * plain_calls[0] > 0  # each MoE forward ran again in the backward
    for name in want:  # the recomputation is the same computation: bit for bit
        assert torch.equal(got[name], want[name]), name
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in want_rows]
    assert list(checkpointed.state_dict()) == list(plain.state_dict())  # names unchanged


def test_a_deep_copy_of_a_checkpointed_model_runs_its_own_weights(sc: ModuleType) -> None:
    model = parallelize(sc.make_model(), ParallelConfig(activation_checkpointing=True))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    x = sc.batch_fn(0, 0)["x"]
    assert twin.layers[0].forward.__self__ is twin.layers[0]
    assert not torch.allclose(twin(x), model(x))


def test_compiled_checkpointed_blocks_keep_the_numbers_and_compile_once(
    sc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = CompileCounterWithBackend("aot_eager")  # dynamo + AOTAutograd, no codegen
    monkeypatch.setattr(apply_module, "_COMPILE_BACKEND", counter)
    torch._dynamo.reset()
    model = parallelize(
        sc.make_model(), ParallelConfig(activation_checkpointing=True, compile=True)
    )
    frames: list[int] = []
    trainer = Trainer(
        model,
        sc.trainer_config(tmp_path / "compiled", max_steps=3),
        data=sc.batch_fn,
        loss_fn=sc.loss_fn,
        on_step=lambda step, m: frames.append(counter.frame_count),
    )
    rows = trainer.fit()
    assert frames[0] >= 1 and frames == [frames[0]] * 3  # compiled at step 1, never again
    want, want_rows = _train(sc, sc.make_model(), tmp_path / "plain", max_steps=3)
    got = sc.full_params(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    for g, w in zip(rows, want_rows, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- one rank


@contextlib.contextmanager
def _one_rank_group(backend: str) -> Iterator[None]:
    """A default process group of one rank, in this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture
def one_rank() -> Iterator[None]:
    with _one_rank_group("gloo"):
        yield


@pytest.mark.parametrize(
    "options",
    [
        {"data_parallel": "fsdp"},
        {"data_parallel": "fsdp", "activation_checkpointing": True},
        {"data_parallel": "ddp"},
    ],
    ids=["fsdp", "fsdp+ac", "ddp"],
)
def test_one_rank_data_parallel_equals_the_plain_trainer(
    sc: ModuleType, tmp_path: Path, one_rank: None, options: dict[str, Any]
) -> None:
    want, want_rows = _train(sc, sc.make_model(), tmp_path / "plain", checkpoint_every=2)
    model = parallelize(sc.make_model(), ParallelConfig(**options))
    got, rows = _train(sc, model, tmp_path / "dp", checkpoint_every=2)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    for g, w in zip(rows, want_rows, strict=True):
        for key in ("loss", "grad_norm", "pred_mean"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)
    # the checkpoint holds the same full weights, under the plain model's names
    step = "checkpoints/step_00000004/model.safetensors"
    saved, saved_plain = (
        load_safetensors(tmp_path / "dp" / step),
        load_safetensors(tmp_path / "plain" / step),
    )
    assert saved.keys() == saved_plain.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], saved_plain[name], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_rank_fsdp_over_nccl_equals_the_plain_trainer(sc: ModuleType, tmp_path: Path) -> None:
    """The CUDA path: NCCL, a CUDA device mesh, the metrics all-reduce on the GPU."""
    torch.cuda.set_device(0)
    want, want_rows = _train(sc, sc.make_model().cuda(), tmp_path / "plain", checkpoint_every=2)
    with _one_rank_group("nccl"):
        options = ParallelConfig(data_parallel="fsdp", activation_checkpointing=True)
        model = parallelize(sc.make_model().cuda(), options)
        got, rows = _train(
            sc, model, tmp_path / "fsdp", checkpoint_every=2, sharded_checkpoints=True
        )
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)
    for g, w in zip(rows, want_rows, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5)
