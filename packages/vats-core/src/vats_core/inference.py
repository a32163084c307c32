"""Inference loops on a model compiled with inductor's *freezing*: weights baked in as constants.

With ``torch.compile(model, options={"freezing": True})`` inductor treats the parameters and
buffers of the graph as constants instead of inputs, when the graph is compiled for
inference (gradients off). It can then fold computations on the weights into the compiled
code once (constant folding), and lay the weights out for the kernels once, ahead of every
call: on CPU, linear and convolution weights are pre-packed for oneDNN. This is how a
serving or evaluation loop over fixed weights gets its speed from plain PyTorch code (see
``torch._inductor.config.freezing``).

:func:`compile_frozen` wraps a model in :class:`FrozenModel`, an ``nn.Module`` that calls
the compiled model. Because the weights are constants of the compiled code:

* it runs only with gradients off (inside ``torch.no_grad()`` or ``torch.inference_mode()``);
  called with gradients on it raises instead of silently compiling a graph without freezing;
* the model must be in eval mode, and stays so (a training-mode graph would freeze dropout);
* weights must not change afterwards: an optimizer step, ``load_state_dict`` or any in-place
  update needs a new ``compile_frozen(model)``. Each call checks the version counters of
  the weights (one integer read per tensor) and raises if they moved; writes through
  ``.data`` bypass those counters and are not caught.

Inputs of a new shape compile again (once per shape, then dynamic shapes); the first call
on CPU compiles for several seconds (tens for a large model). The compiled code may keep
transformed copies of the weights (packed layouts) beside the model's own.

Example::

    from vats_core.inference import compile_frozen

    model = ViT2D.from_pretrained("out/vit").eval()
    frozen = compile_frozen(model)
    with torch.no_grad():
        for x in batches:
            logits = frozen(x)  # same outputs as model(x), to float rounding
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vats_core.moe import COMPILE_SETTINGS

__all__ = ["FrozenModel", "compile_frozen"]

# torch.compile backend; freezing is an inductor option. Tests swap in "eager" (dynamo alone,
# no options) to check the wrapper's guards without waiting for code generation.
_BACKEND: str | Callable[..., Any] = "inductor"


class FrozenModel(nn.Module):
    """A model compiled for inference with its weights frozen; build it with
    :func:`compile_frozen`.

    Calling it calls the compiled model with the same arguments. The wrapped model is
    ``.module`` (its parameters are this module's, listed once); keep using the model
    itself for anything but the compiled inference calls.
    """

    def __init__(self, model: nn.Module, *, dynamic: bool | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"compile_frozen needs an nn.Module, got {type(model).__name__}")
        if model.training:
            raise ValueError(
                f"{type(model).__name__} is in training mode: call model.eval() before "
                "compile_frozen (freezing compiles the inference graph; dropout would be baked in)"
            )
        if _BACKEND == "inductor" and importlib.util.find_spec("setuptools") is None:
            raise ValueError(
                "compile_frozen runs torch.compile, whose CPU code generation needs "
                "setuptools: pip install setuptools (or call the model eagerly)"
            )
        self.module = model
        options = {"freezing": True} if _BACKEND == "inductor" else None
        compiled = torch.compile(model, backend=_BACKEND, dynamic=dynamic, options=options)
        # Kept out of the module tree: parameters() and state_dict() list the weights once,
        # under "module.", not a second time under the compiled wrapper's "_orig_mod.".
        object.__setattr__(self, "_compiled", compiled)
        # The weights the compiled code may hold as constants (parameters and saved
        # buffers; caches and other non-persistent buffers may change between calls), with
        # their version counters, which every in-place write through autograd bumps.
        self._weights = list(model.state_dict(keep_vars=True).items())
        self._versions = [t._version for _, t in self._weights]
        self.train(False)  # the wrapper reports eval mode, as its model is in

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the compiled model.

        Raises:
            RuntimeError: gradients are enabled, the model was put back in training mode,
                or a weight was changed in place since :func:`compile_frozen`.
        """
        if torch.is_grad_enabled():
            raise RuntimeError(
                "a FrozenModel runs with gradients off: call it inside torch.no_grad() or "
                "torch.inference_mode() (frozen weights are constants: nothing to differentiate)"
            )
        if self.module.training:
            raise RuntimeError(
                f"{type(self.module).__name__} was put back in training mode after "
                "compile_frozen: call model.eval() (the frozen graph is the inference one)"
            )
        for (name, t), version in zip(self._weights, self._versions, strict=True):
            if t._version != version:
                raise RuntimeError(
                    f"{name} of {type(self.module).__name__} changed after compile_frozen, "
                    "but the compiled code holds the old weights as constants: call "
                    "compile_frozen(model) again after changing weights"
                )
        # (MoE expert groups: data-dependent sizes inside the graph, not a graph break)
        with torch._dynamo.config.patch(**COMPILE_SETTINGS):
            return self._compiled(*args, **kwargs)


def compile_frozen(model: nn.Module, *, dynamic: bool | None = None) -> FrozenModel:
    """Compile ``model`` for inference with inductor's freezing (weights as constants).

    See the module docstring for what freezing buys and the rules it imposes: gradients
    off at every call, eval mode, and a new ``compile_frozen`` after any weight change.
    Compilation happens at the first call.

    Args:
        model: an ``nn.Module`` in eval mode, on its device and dtype.
        dynamic: passed to ``torch.compile``: None (default) compiles the first input
            shapes statically and recompiles with dynamic shapes when they change; True
            compiles dynamic shapes from the start; False one graph per shape.

    Returns:
        A :class:`FrozenModel` to call like the model.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, is in training mode, or setuptools
            (needed by inductor's CPU code generation) is missing.
    """
    return FrozenModel(model, dynamic=dynamic)
