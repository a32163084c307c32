"""Model-contract checks that every vats package's tests reuse.

Each check raises ``AssertionError`` with a message that says what broke (which
parameter got no gradient, which output differs after a reload), so a test is one
line::

    def test_tiny_vit_contract(tmp_path):
        model, x = ViT(tiny()), torch.randn(2, 3, 32, 32)
        check_forward(model, x, (2, 10))
        check_backward(model, x)
        check_save_load_roundtrip(model, x, tmp_path)
        check_dtype_device_moves(model, x)
        check_raises(lambda: model(x[:, :1]), ValueError, "channels")

Configs have one contract check too, :func:`check_config`, run on every config class
that :func:`config_classes` finds in a package.

``inputs`` is a Tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict of
keyword arguments (``model(**inputs)``). Models may return a Tensor, a tuple (the first
element is checked) or anything else with an ``output_fn(output) -> Tensor`` that
picks the tensor to compare.

This module imports no test framework: it is plain asserts and
``torch.testing.assert_close``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config

__all__ = [
    "check_autocast_training",
    "check_backward",
    "check_config",
    "check_dtype_device_moves",
    "check_forward",
    "check_raises",
    "check_save_load_roundtrip",
    "config_classes",
    "default_output",
    "int_fields",
]

Inputs = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]
OutputFn = Callable[[Any], torch.Tensor]


def default_output(output: Any) -> torch.Tensor:
    """The tensor to check in a model output: the Tensor itself or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise AssertionError(
        f"cannot pick a tensor from a model output of type {type(output).__name__}: pass "
        "output_fn=... to select it (e.g. output_fn=lambda out: out.logits)"
    )


def _call(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _map_tensors(inputs: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in nested tuples/lists/dicts/dataclasses."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: _map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(_map_tensors(v, fn) for v in inputs)
    if dataclasses.is_dataclass(inputs) and not isinstance(inputs, type):
        changes = {
            f.name: _map_tensors(getattr(inputs, f.name), fn) for f in dataclasses.fields(inputs)
        }
        return dataclasses.replace(inputs, **changes)
    return inputs


def _output(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None) -> torch.Tensor:
    out = (output_fn or default_output)(_call(model, inputs))
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"output_fn returned a {type(out).__name__}, not a Tensor")
    return out


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


# --------------------------------------------------------------------------- checks


def check_forward(
    model: nn.Module,
    inputs: Inputs,
    expected_shape: Sequence[int | None],
    *,
    output_fn: OutputFn | None = None,
) -> torch.Tensor:
    """The forward pass runs, has ``expected_shape`` and is finite everywhere.

    Args:
        model: the model (its train/eval mode is left as it is).
        inputs: see the module docstring.
        expected_shape: the output shape; ``None`` entries match any size.
        output_fn: picks the tensor from the model output.

    Returns:
        The checked output tensor (computed under ``torch.no_grad``).
    """
    with torch.no_grad():
        out = _output(model, inputs, output_fn)
    expected = tuple(expected_shape)
    shape_ok = out.ndim == len(expected) and all(
        e is None or e == s for e, s in zip(expected, out.shape, strict=False)
    )
    assert shape_ok, (
        f"{_model_name(model)} output has shape {tuple(out.shape)}, expected {expected}"
    )
    if out.is_floating_point() or out.is_complex():
        bad = (~torch.isfinite(out)).sum().item()
        assert bad == 0, (
            f"{_model_name(model)} output has {bad} non-finite value(s) of {out.numel()}"
        )
    return out


def check_backward(
    model: nn.Module,
    inputs: Inputs,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    output_fn: OutputFn | None = None,
    allow_no_grad: Sequence[str] = (),
) -> None:
    """Every trainable parameter gets a finite, non-None gradient from one backward.

    Catches parameters that are unused or detached from the graph, and NaN/inf
    gradients. Gradients are cleared before and after, so the model is left as it came.

    Args:
        model: the model; its train/eval mode is left as it is.
        inputs: see the module docstring.
        loss_fn: scalar loss from the output tensor; default: the output summed
            against fixed random weights (so no parameter gets an identically zero
            gradient by symmetry of a plain sum).
        output_fn: picks the tensor from the model output.
        allow_no_grad: names of parameters allowed to have no gradient (e.g. experts
            that no token reached).
    """
    model.zero_grad(set_to_none=True)
    out = _output(model, inputs, output_fn)
    if loss_fn is None:
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
        loss = (out.double() * weights.to(out.device)).sum()
    else:
        loss = loss_fn(out)
    assert isinstance(loss, torch.Tensor) and loss.numel() == 1, (
        f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
    )
    assert loss.requires_grad, (
        f"{_model_name(model)}: the loss does not require grad: no parameter reaches the output"
    )
    loss.backward()
    missing, non_finite = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or name in allow_no_grad:
            continue
        if param.grad is None:
            missing.append(name)
        elif not torch.isfinite(param.grad).all():
            non_finite.append(name)
    model.zero_grad(set_to_none=True)
    assert not missing, f"{_model_name(model)}: parameter(s) got no gradient: {missing}"
    assert not non_finite, (
        f"{_model_name(model)}: parameter(s) got non-finite gradients: {non_finite}"
    )


def check_save_load_roundtrip(
    model: nn.Module,
    inputs: Inputs,
    tmp_dir: str | os.PathLike[str],
    *,
    output_fn: OutputFn | None = None,
) -> nn.Module:
    """``save_pretrained`` then ``from_pretrained`` gives an identical model.

    Compares the state dicts (names, dtypes, values) and the eval-mode outputs,
    bitwise. A buffer that the save drops (``persistent=False`` but changed after
    construction) or a weight the constructor re-initializes shows up here, and so does
    a tensor kept as a plain attribute (``from_pretrained`` builds on the meta device and
    reports what it leaves there).

    Returns:
        The reloaded model.
    """
    assert isinstance(model, PretrainedMixin), (
        f"{_model_name(model)} does not use PretrainedMixin: no save_pretrained/from_pretrained"
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _output(model, inputs, output_fn)
        try:
            model.save_pretrained(tmp_dir)
            reloaded = type(model).from_pretrained(tmp_dir, device=device)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise AssertionError(f"{_model_name(model)} failed to save and reload: {e}") from e
        reloaded.eval()
        before, after = model.state_dict(), reloaded.state_dict()
        assert before.keys() == after.keys(), (
            f"state_dict keys differ after reload: lost {sorted(before.keys() - after.keys())}, "
            f"gained {sorted(after.keys() - before.keys())}"
        )
        for name, tensor in before.items():
            torch.testing.assert_close(
                after[name], tensor, rtol=0, atol=0, msg=lambda m, n=name: f"{n} differs: {m}"
            )
        with torch.no_grad():
            actual = _output(reloaded, inputs, output_fn)
        torch.testing.assert_close(
            actual,
            expected,
            rtol=0,
            atol=0,
            msg=lambda m: f"{_model_name(model)} outputs differ after save/load: {m}",
        )
    finally:
        model.train(was_training)
    return reloaded


def check_dtype_device_moves(
    model: nn.Module,
    inputs: Inputs,
    *,
    output_fn: OutputFn | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    cuda_rtol: float = 1e-3,
    cuda_atol: float = 1e-4,
) -> None:
    """The model follows ``.double()`` and ``.to(device)`` and computes the same function.

    On copies of the model in eval mode: ``model.double()`` with float64 inputs gives a
    float64 output close to the float32 one (catches tensors that are not registered as
    parameters/buffers and hard-coded dtypes); where CUDA exists, ``.to("cuda")`` gives
    outputs on CUDA close to the CPU ones, and moving back to CPU restores them exactly.

    Args:
        rtol, atol: float64 vs float32 tolerance.
        cuda_rtol, cuda_atol: CUDA vs CPU tolerance (different kernels, TF32 off).
    """
    base = copy.deepcopy(model).eval()
    device = next(base.parameters()).device
    with torch.no_grad():
        reference = _output(base, inputs, output_fn)

        wide = copy.deepcopy(base).double()
        wide_inputs = _map_tensors(inputs, lambda t: t.double() if t.is_floating_point() else t)
        try:
            wide_out = _output(wide, wide_inputs, output_fn)
        except RuntimeError as e:
            raise AssertionError(f"{_model_name(model)} fails after .double(): {e}") from e
        assert wide_out.dtype == torch.float64 or not reference.is_floating_point(), (
            f"{_model_name(model)} after .double() returns {wide_out.dtype}, expected float64: "
            "something inside casts or holds a fixed dtype"
        )
        torch.testing.assert_close(
            wide_out.to(reference.dtype),
            reference,
            rtol=rtol,
            atol=atol,
            msg=lambda m: f"{_model_name(model)} float64 output differs from float32: {m}",
        )

        if not torch.cuda.is_available():
            return
        other = torch.device("cpu") if device.type == "cuda" else torch.device("cuda")
        moved = copy.deepcopy(base).to(other)
        stray = [
            name
            for name, t in [*moved.named_parameters(), *moved.named_buffers()]
            if t.device.type != other.type
        ]
        assert not stray, f"{_model_name(model)}: {stray} did not move to {other}"
        moved_inputs = _map_tensors(inputs, lambda t: t.to(other))
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # compare full fp32 arithmetic
        try:
            moved_out = _output(moved, moved_inputs, output_fn)
        except RuntimeError as e:
            raise AssertionError(f"{_model_name(model)} fails after .to({other}): {e}") from e
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        assert moved_out.device.type == other.type, (
            f"{_model_name(model)} on {other} returned an output on {moved_out.device}"
        )
        torch.testing.assert_close(
            moved_out.to(device),
            reference,
            rtol=cuda_rtol,
            atol=cuda_atol,
            msg=lambda m: f"{_model_name(model)} output on {other} differs: {m}",
        )
        back = moved.to(device)
        torch.testing.assert_close(
            _output(back, inputs, output_fn),
            reference,
            rtol=0,
            atol=0,
            msg=lambda m: f"{_model_name(model)} output changed after a round trip: {m}",
        )


def check_autocast_training(
    model: nn.Module,
    inputs: Inputs,
    device: str | torch.device,
    *,
    dtype: torch.dtype = torch.bfloat16,
    output_fn: OutputFn | None = None,
    max_relative_error: float = 5e-2,
) -> None:
    """The model trains under ``torch.autocast(device, dtype)`` as the trainer runs it.

    On a copy moved to ``device`` (inputs too): in eval mode the autocast output is close
    to the float32 one (relative Frobenius error at most ``max_relative_error``: bf16
    keeps 8 bits of mantissa, so a few percent after a deep stack, not exactness); in train
    mode one forward, backward and AdamW step under autocast gives a finite loss, every
    trainable parameter a finite float32 gradient, and float32 weights that moved (mixed
    precision keeps master weights in float32; a module that casts its own parameters or
    detaches under autocast fails here).
    """
    device = torch.device(device)
    moved = copy.deepcopy(model).to(device)
    moved_inputs = _map_tensors(inputs, lambda t: t.to(device))
    amp = torch.autocast(device.type, dtype=dtype)
    moved.eval()
    with torch.no_grad():
        full = _output(moved, moved_inputs, output_fn).float()
        with amp:
            low = _output(moved, moved_inputs, output_fn).float()
    error = ((low - full).double().norm() / full.double().norm().clamp_min(1e-12)).item()
    assert error <= max_relative_error, (
        f"{_model_name(model)} under autocast({dtype}) on {device}: relative error {error:.3g} "
        f"against float32, more than {max_relative_error}"
    )
    moved.train()
    before = {name: p.detach().clone() for name, p in moved.named_parameters()}
    optimizer = torch.optim.AdamW(moved.parameters(), lr=1e-3)
    with amp:
        out = _output(moved, moved_inputs, output_fn)
    loss = out.float().square().mean()
    assert torch.isfinite(loss), f"{_model_name(model)}: non-finite loss under autocast"
    loss.backward()
    bad = [
        name
        for name, p in moved.named_parameters()
        if p.requires_grad
        and (p.grad is None or p.grad.dtype != p.dtype or not torch.isfinite(p.grad).all())
    ]
    assert not bad, (
        f"{_model_name(model)}: under autocast, no finite gradient of the parameter's own "
        f"dtype for {bad}"
    )
    optimizer.step()
    low_weights = [n for n, p in moved.named_parameters() if p.dtype != before[n].dtype]
    assert not low_weights, f"{_model_name(model)}: weights changed dtype: {low_weights}"
    assert any(not torch.equal(p, before[n]) for n, p in moved.named_parameters()), (
        f"{_model_name(model)}: an AdamW step under autocast moved no weight"
    )


def check_raises(
    fn: Callable[[], Any], exc_type: type[BaseException], match: str | None = None
) -> BaseException:
    """``fn()`` raises ``exc_type`` whose message matches the regex ``match`` (re.search).

    Returns:
        The exception, for further checks.
    """
    try:
        fn()
    except exc_type as e:
        if match is not None and not re.search(match, str(e)):
            raise AssertionError(
                f"{type(e).__name__} raised, but its message {str(e)!r} does not match {match!r}"
            ) from e
        return e
    except Exception as e:
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc_type.__name__}, but nothing was raised")


def config_classes(package: str) -> list[type[Config]]:
    """Every :class:`~vats_core.config.Config` subclass defined in ``package`` (all of its
    modules are imported first), sorted by name: what a package's config test covers."""
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)
    found: set[type[Config]] = set()
    todo = [Config]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__ == package or sub.__module__.startswith(f"{package}."):
                found.add(sub)
    return sorted(found, key=lambda c: c.__qualname__)


def int_fields(cls: type[Config]) -> list[str]:
    """The fields of ``cls`` annotated ``int`` or ``int | None``."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = typing.get_args(hint) if union else (hint,)
        if int in args and float not in args:
            names.append(f.name)
    return names


def check_config(config: Config) -> None:
    """The config contract: ``config`` hashes; ``to_dict`` / ``from_dict`` and JSON rebuild
    an equal config with an equal hash; every int field rejects ``64.0`` and ``True`` with
    a ValueError that names the config and the field."""
    cls, name = type(config), type(config).__name__
    try:
        key = hash(config)
    except TypeError as e:
        raise AssertionError(f"{name} does not hash ({e}): sequence fields must be tuples") from e
    for how, back in (
        ("to_dict / from_dict", cls.from_dict(config.to_dict())),
        ("to_json / from_dict", cls.from_dict(json.loads(config.to_json()))),
    ):
        assert back == config, f"{name} {how} gives {back!r}, expected {config!r}"
        assert hash(back) == key, f"{name} {how} gives an equal config with another hash"
    for field in int_fields(cls):
        for bad in (64.0, True):
            check_raises(
                lambda field=field, bad=bad: config.replace(**{field: bad}),
                ValueError,
                rf"{name}\.{field}={bad!r} is invalid",
            )
