"""save_pretrained / from_pretrained: round trips, tied weights, clear errors, atomic saves."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vats_core import checkpoint
from vats_core.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedMixin,
    atomic_write_text,
    load_safetensors,
    save_safetensors,
)
from vats_core.config import Config, check


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToyConfig(Config):
    vocab: int = 11
    dim: int = 8
    tie: bool = True

    def __post_init__(self) -> None:
        check(self.dim >= 1, self, "dim", self.dim, "an int >= 1")


class ToyLM(PretrainedMixin, nn.Module):
    """Embedding -> Linear -> head tied to the embedding, plus a persistent buffer."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.mix = nn.Linear(config.dim, config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        if config.tie:
            self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(config.dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))) * self.scale)


class OtherModel(PretrainedMixin, nn.Module):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)


class SharedLinears(nn.Module):
    """Two Linear layers sharing one weight (not a PretrainedMixin)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight


def _trained_model(seed: int = 0, **overrides: object) -> ToyLM:
    torch.manual_seed(seed)
    model = ToyLM(ToyConfig(**overrides))
    with torch.no_grad():
        model.scale.uniform_(0.5, 1.5)  # a non-default buffer value must survive the trip
    return model


IDS = torch.tensor([[1, 2, 3, 4], [10, 0, 5, 5]])


def test_round_trip_identical_outputs_and_tie_restored(tmp_path: Path) -> None:
    model = _trained_model()
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path)
    assert not loaded.training
    torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    # The tie is a tie again (one Parameter), not two equal copies.
    assert loaded.head.weight is loaded.embed.weight
    # The file stores the tied tensor once.
    from safetensors import safe_open

    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        assert set(f.keys()) == {"embed.weight", "mix.weight", "mix.bias", "scale"}
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["model_type"] == "ToyLM"
    assert config["vats_format_version"] == checkpoint.FORMAT_VERSION
    assert config["dim"] == 8


def test_untied_round_trip(tmp_path: Path) -> None:
    model = _trained_model(tie=False)
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path)
    assert loaded.head.weight is not loaded.embed.weight
    torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)


def test_dtype_argument_casts_floating_tensors(tmp_path: Path) -> None:
    model = _trained_model()
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert loaded.scale.dtype == torch.float64
    assert loaded.head.weight is loaded.embed.weight
    # fp32 -> fp64 is exact, so the float64 weights equal the saved ones.
    torch.testing.assert_close(loaded.mix.weight, model.mix.weight.double(), rtol=0, atol=0)
    torch.testing.assert_close(loaded(IDS), model(IDS).double(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        ToyLM.from_pretrained(tmp_path, dtype=torch.int64)


def test_float64_weights_load_as_float64_bit_for_bit(tmp_path: Path) -> None:
    # one cast from the file's dtype to the requested one: no float32 stop on the way
    model = _trained_model().double()
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path, dtype=torch.float64)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_device_argument(tmp_path: Path) -> None:
    model = _trained_model()
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path, device="cpu")
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_argument_cuda(tmp_path: Path) -> None:
    model = _trained_model()
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.head.weight is loaded.embed.weight
    torch.testing.assert_close(
        loaded.mix.weight.float().cpu(), model.mix.weight.bfloat16().float(), rtol=0, atol=0
    )


def test_shared_linear_weights_save_and_load(tmp_path: Path) -> None:
    """safetensors refuses aliased tensors; save_safetensors stores one and restores both."""
    torch.manual_seed(0)
    model = SharedLinears()
    path = tmp_path / "w.safetensors"
    save_safetensors(model.state_dict(), path)
    tensors = load_safetensors(path)
    assert set(tensors) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    assert tensors["a.weight"] is tensors["b.weight"]
    fresh = SharedLinears()
    fresh.load_state_dict(tensors)
    assert fresh.a.weight is fresh.b.weight
    torch.testing.assert_close(fresh.b.weight, model.a.weight, rtol=0, atol=0)


def test_overlapping_views_are_stored_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    state = {"first": base[:6], "second": base[3:9].view(2, 3)}
    save_safetensors(state, tmp_path / "v.safetensors")
    loaded = load_safetensors(tmp_path / "v.safetensors")
    torch.testing.assert_close(loaded["first"], base[:6])
    torch.testing.assert_close(loaded["second"], base[3:9].view(2, 3))


# --------------------------------------------------------------------------- meta-device loading


class _RealStorages(TorchDispatchMode):
    """Records every non-meta storage an aten op returns while active: address -> bytes.

    Allocations (``empty``, ``uniform_`` on fresh weights, copies) and the tensors the
    safetensors reader creates all pass through the dispatcher, so this sees the memory a
    load creates, whatever Python-level path made it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                self.storages[storage.data_ptr()] = storage.nbytes()
        return out


def test_from_pretrained_holds_one_copy_of_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loaded model's tensors are the very tensors read from the file, and building it
    allocated no weights of its own: one copy of the weights, not a random model plus the
    file's (the old construct-then-copy load held two)."""
    model = _trained_model(vocab=2048, dim=128, tie=False)  # ~2.1 MB of float32
    model.save_pretrained(tmp_path)
    n_bytes = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    read: list[dict[str, torch.Tensor]] = []

    def recording_load(path: Path) -> dict[str, torch.Tensor]:
        read.append(load_safetensors(path))
        return read[-1]

    monkeypatch.setattr(checkpoint, "load_safetensors", recording_load)
    with _RealStorages() as seen:
        loaded = ToyLM.from_pretrained(tmp_path)
    (file_tensors,) = read
    file_storages = {t.untyped_storage().data_ptr() for t in file_tensors.values()}
    model_storages = {t.untyped_storage().data_ptr() for t in loaded.state_dict().values()}
    assert model_storages == file_storages  # the weights were handed over, not copied
    other = sum(n for ptr, n in seen.storages.items() if ptr not in file_storages)
    assert other < 0.01 * n_bytes, f"{other} bytes allocated beside the {n_bytes} of the file"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert all(p.requires_grad for p in loaded.parameters())


@dataclasses.dataclass(frozen=True, kw_only=True)
class BufferConfig(Config):
    dim: int = 6


class FreqTable(nn.Module):
    """A RoPE-like module: a non-persistent buffer derived from the config, recreated by
    the documented hook."""

    hook_calls = 0

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        type(self).hook_calls += 1
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        self.register_buffer("inv_freq", inv, persistent=False)


class PlainTable(nn.Module):
    """A non-persistent buffer with no hook: from_pretrained takes it from a real build."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("steps", torch.linspace(-1.0, 1.0, dim), persistent=False)
        self.register_buffer("count", torch.arange(dim), persistent=False)  # integer: kept


class BufferNet(PretrainedMixin, nn.Module):
    config_class = BufferConfig
    built_on: ClassVar[list[str]] = []

    def __init__(self, config: BufferConfig) -> None:
        super().__init__()
        type(self).built_on.append(torch.empty(0).device.type)  # the default device now
        self.config = config
        self.proj = nn.Linear(config.dim, config.dim)
        self.freqs = FreqTable(config.dim)
        self.table = PlainTable(config.dim)
        self.register_buffer("gain", torch.ones(config.dim))  # persistent: from the file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x[..., : self.config.dim // 2] * self.freqs.inv_freq
        return self.proj(x * self.table.steps * self.gain) + angles.sin().sum(-1, keepdim=True)


def _all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_non_persistent_buffers_are_materialised_on_the_target_device(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BufferNet(BufferConfig())
    with torch.no_grad():
        model.gain.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    BufferNet.built_on.clear()
    FreqTable.hook_calls = 0
    loaded = BufferNet.from_pretrained(tmp_path)
    # Built on meta; PlainTable has no hook, so one real build supplied its buffers.
    assert BufferNet.built_on == ["meta", "cpu"]
    assert FreqTable.hook_calls == 3  # meta build, real build, then the hook on the load
    expected = _all_tensors(model)
    actual = _all_tensors(loaded)
    assert actual.keys() == expected.keys()
    assert {"freqs.inv_freq", "table.steps", "table.count"} <= actual.keys()
    for name, tensor in expected.items():
        assert actual[name].device.type == "cpu", name
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name  # bit for bit, buffers included
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))

    as64 = BufferNet.from_pretrained(tmp_path, dtype=torch.float64)
    assert as64.freqs.inv_freq.dtype == as64.table.steps.dtype == torch.float64
    assert as64.table.count.dtype == torch.int64  # integer buffers are not cast
    assert torch.equal(as64.table.steps, model.table.steps.double())


def test_meta_build_with_only_hooked_buffers_runs_the_constructor_once(tmp_path: Path) -> None:
    class HookedOnly(PretrainedMixin, nn.Module):
        config_class = BufferConfig
        built_on: ClassVar[list[str]] = []

        def __init__(self, config: BufferConfig) -> None:
            super().__init__()
            type(self).built_on.append(torch.empty(0).device.type)
            self.config = config
            self.proj = nn.Linear(config.dim, config.dim)
            self.freqs = FreqTable(config.dim)

    model = HookedOnly(BufferConfig())
    model.save_pretrained(tmp_path)
    HookedOnly.built_on.clear()
    loaded = HookedOnly.from_pretrained(tmp_path)
    assert HookedOnly.built_on == ["meta"]  # no real build: no random weights ever made
    assert torch.equal(loaded.freqs.inv_freq, model.freqs.inv_freq)


def test_constructor_that_reads_values_or_hides_tensors_is_reported(tmp_path: Path) -> None:
    class ReadsValues(PretrainedMixin, nn.Module):
        config_class = BufferConfig

        def __init__(self, config: BufferConfig) -> None:
            super().__init__()
            self.config = config
            self.proj = nn.Linear(config.dim, config.dim)
            self.scale = float(torch.ones(()).item())  # cannot work on the meta device

    class HiddenTensor(PretrainedMixin, nn.Module):
        config_class = BufferConfig

        def __init__(self, config: BufferConfig) -> None:
            super().__init__()
            self.config = config
            self.proj = nn.Linear(config.dim, config.dim)
            self.table = torch.ones(config.dim)  # neither parameter nor buffer

    for cls, match in (
        (ReadsValues, r"ReadsValues's constructor cannot run on the meta device"),
        (HiddenTensor, r"left tensor\(s\) on the meta device: \['table'\]"),
    ):
        d = tmp_path / cls.__name__
        cls(BufferConfig()).save_pretrained(d)
        with pytest.raises(RuntimeError, match=match):
            cls.from_pretrained(d)


def test_tied_weights_are_one_parameter_after_loading(tmp_path: Path) -> None:
    model = _trained_model()
    model.save_pretrained(tmp_path)
    loaded = ToyLM.from_pretrained(tmp_path).train()
    assert len(list(loaded.parameters())) == len(list(model.parameters())) == 3
    # One tensor: an update through either name is seen by the other.
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    loaded(IDS).square().mean().backward()
    optimizer.step()
    assert loaded.head.weight is loaded.embed.weight
    assert not torch.equal(loaded.embed.weight, model.embed.weight)


# --------------------------------------------------------------------------- errors


def _saved(tmp_path: Path) -> Path:
    _trained_model().save_pretrained(tmp_path)
    return tmp_path


def test_missing_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        ToyLM.from_pretrained(tmp_path / "nope")
    d = _saved(tmp_path / "a")
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        ToyLM.from_pretrained(d)
    d = _saved(tmp_path / "b")
    (d / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ToyLM.from_pretrained(d)


def test_corrupt_weights_random_bytes(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    (d / WEIGHTS_NAME).write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    )
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        ToyLM.from_pretrained(d)


@pytest.mark.parametrize("keep", [0, 5, 100, -7])
def test_truncated_weights(tmp_path: Path, keep: int) -> None:
    d = _saved(tmp_path)
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[:keep])  # keep<0: lose the tail of the tensor data
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        ToyLM.from_pretrained(d)


@pytest.mark.parametrize("text", ['{"model_type": "ToyLM", "dim": ', "\x00\x01garbage", "[1, 2]"])
def test_corrupt_config_json(tmp_path: Path, text: str) -> None:
    d = _saved(tmp_path)
    (d / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=r"config\.json is corrupt"):
        ToyLM.from_pretrained(d)


def test_wrong_model_type(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'ToyLM' model.*OtherModel\.from_pretrained"):
        OtherModel.from_pretrained(d)


def test_config_that_fails_validation(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    data = json.loads((d / CONFIG_NAME).read_text())
    data["dim"] = 0
    (d / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"ToyConfig\.dim=0 is invalid"):
        ToyLM.from_pretrained(d)
    data["dim"], data["typo_field"] = 8, 1
    (d / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="typo_field"):
        ToyLM.from_pretrained(d)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    data = json.loads((d / CONFIG_NAME).read_text())
    data["vats_format_version"] = checkpoint.FORMAT_VERSION + 1
    (d / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version"):
        ToyLM.from_pretrained(d)


def _rewrite_weights(d: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_safetensors(d / WEIGHTS_NAME)
    del tensors["head.weight"]  # stored once, as embed.weight
    edit(tensors)
    save_safetensors(tensors, d / WEIGHTS_NAME)


def test_shape_mismatch_lists_the_key(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    _rewrite_weights(d, lambda t: t.__setitem__("mix.weight", torch.zeros(8, 9)))
    with pytest.raises(
        ValueError, match=r"shape mismatch.*mix\.weight: file \(8, 9\) vs model \(8, 8\)"
    ):
        ToyLM.from_pretrained(d)


def test_config_that_does_not_fit_the_weights(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    data = json.loads((d / CONFIG_NAME).read_text())
    data["dim"] = 6
    (d / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"do not fit ToyLM: .*shape mismatch"):
        ToyLM.from_pretrained(d)


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    d = _saved(tmp_path)

    def edit(t: dict[str, torch.Tensor]) -> None:
        del t["mix.bias"]
        t["extra.weight"] = torch.zeros(2)
        for i in range(7):
            t[f"more.{i}"] = torch.zeros(1)

    _rewrite_weights(d, edit)
    with pytest.raises(ValueError) as info:
        ToyLM.from_pretrained(d)
    message = str(info.value)
    assert "1 missing key(s) ['mix.bias']" in message
    assert "8 unexpected key(s)" in message and "'extra.weight'" in message
    assert "and 3 more" in message  # only the first few are listed


def test_errors_leave_parameters_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs before load_state_dict: a mismatch never half-loads a model."""
    d = _saved(tmp_path)
    _rewrite_weights(d, lambda t: t.__setitem__("mix.weight", torch.zeros(8, 9)))
    calls = []
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError):
        ToyLM.from_pretrained(d)
    assert calls == []


# --------------------------------------------------------------------------- atomicity


def test_failed_save_leaves_previous_files_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _trained_model(seed=1)
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full while serializing")

    monkeypatch.setattr(checkpoint, "save_file", explode)
    new = _trained_model(seed=2, dim=6)
    with pytest.raises(RuntimeError, match="disk full"):
        new.save_pretrained(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # same files, same bytes, no temporary debris
    monkeypatch.undo()
    torch.testing.assert_close(ToyLM.from_pretrained(tmp_path)(IDS), old(IDS), rtol=0, atol=0)


def test_save_over_existing_directory_replaces_and_keeps_other_files(tmp_path: Path) -> None:
    _trained_model(seed=1).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("notes")
    new = _trained_model(seed=2, dim=6)
    new.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    torch.testing.assert_close(ToyLM.from_pretrained(tmp_path)(IDS), new(IDS), rtol=0, atol=0)


def test_atomic_write_text_failure_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError), checkpoint.atomic_replace(path) as tmp:
        tmp.write_text("half")
        raise TypeError("boom")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_config_with_reserved_field_name_is_refused(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class BadConfig(Config):
        model_type: str = "x"

    class Bad(PretrainedMixin, nn.Module):
        config_class = BadConfig

        def __init__(self, config: BadConfig) -> None:
            super().__init__()
            self.config = config

    with pytest.raises(ValueError, match="reserves"):
        Bad(BadConfig()).save_pretrained(tmp_path)


class InitNet(PretrainedMixin, nn.Module):
    """Layers whose constructors initialise through nn.init (kaiming, trunc_normal_)."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv1d(config.dim, config.dim, 3, padding=1)
        self.proj = nn.Linear(config.dim, config.dim)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        self.register_buffer("offset", torch.full((config.dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).transpose(1, 2)) + self.offset


def test_from_pretrained_skips_initialising_the_skeleton(tmp_path: Path) -> None:
    # Random init on meta tensors computes nothing, but torch runs it through its Python
    # reference kernels (importing sympy: seconds of a cold load); the skeleton skips it.
    # Real tensors built inside the same mode are still initialised, and persistent
    # buffers (filled at construction) come from the file.
    model = InitNet(ToyConfig())
    model.save_pretrained(tmp_path)
    calls: list[str] = []

    class Count(checkpoint._SkipInitOnMeta):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs)

    with torch.device("meta"), Count():
        skeleton = InitNet(ToyConfig())
    assert skeleton.proj.weight.is_meta and "kaiming_uniform_" in calls
    with Count():
        real = InitNet(ToyConfig())
    assert real.proj.weight.abs().sum() > 0 and real.conv.weight.std() > 0
    loaded = InitNet.from_pretrained(tmp_path)
    x = torch.randn(2, 8, 5)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_cold_from_pretrained_does_not_import_sympy(tmp_path: Path) -> None:
    # In a fresh process: building the skeleton must not reach torch's symbolic shapes.
    import subprocess
    import sys

    InitNet(ToyConfig()).save_pretrained(tmp_path)
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_checkpoint_io import InitNet\n"
        f"InitNet.from_pretrained({str(tmp_path)!r})\n"
        "assert 'sympy' not in sys.modules, 'sympy was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
