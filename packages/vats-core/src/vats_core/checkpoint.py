"""Checkpoint I/O: ``save_pretrained`` / ``from_pretrained``, safetensors helpers, atomic writes.

A saved vats model is a directory holding two files:

- ``config.json``: the model config's :meth:`~vats_core.config.Config.to_dict`, plus
  ``model_type`` (the model class name) and ``vats_format_version``.
- ``model.safetensors``: the weights (the module's ``state_dict``). Tensors that share
  memory (an LM head tied to the token embedding) are stored once; the aliases are
  listed in the file's metadata and restored on load.

Weights are never unpickled: safetensors holds tensors only. Every file is written to
a temporary file in the same directory, fsynced, then renamed over the old one
(``os.replace`` is atomic on POSIX), so a crash or an error mid-save leaves the
previous files intact. Loading checks everything it can (files present, JSON valid,
safetensors header intact, ``model_type``, config validation, key names and shapes)
before a single parameter of the model is written.

``from_pretrained`` builds the model on the meta device and hands it the file's tensors
(``load_state_dict(assign=True)``), so loading holds one copy of the weights, never a
randomly initialised model beside the file's. Buffers that are not saved
(``persistent=False``) are recreated by a module's ``init_non_persistent_buffers()``
method (:data:`INIT_BUFFERS_HOOK`), or taken from one real build of the model when the
module has none.

Example::

    class TinyNet(PretrainedMixin, nn.Module):
        config_class = TinyConfig

        def __init__(self, config: TinyConfig) -> None:
            super().__init__()
            self.config = config
            self.proj = nn.Linear(config.dim, config.dim)

    TinyNet(TinyConfig(dim=8)).save_pretrained("out/tiny")
    model = TinyNet.from_pretrained("out/tiny", dtype=torch.float64)
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from vats_core.config import Config

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "INIT_BUFFERS_HOOK",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_config_json",
    "load_pretrained_state",
    "load_safetensors",
    "save_pretrained",
    "save_safetensors",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1  # bump when the directory layout changes; loaders refuse newer ones

# Keys config.json reserves next to the config's own fields.
_MODEL_TYPE_KEY = "model_type"
_VERSION_KEY = "vats_format_version"
# safetensors metadata key listing aliased (tied) tensors: JSON {alias: stored_name}.
_ALIASES_KEY = "vats_aliases"
_MAX_LISTED = 5  # how many offending keys an error message lists before "... and N more"


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the directory entry itself must be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The caller writes the temporary file. If the block raises, the temporary file is
    removed and ``path`` is untouched; otherwise the file is fsynced and renamed over
    ``path``. The temporary file lives in the same directory, so the rename never
    crosses a filesystem.

    Several ``atomic_replace`` blocks can be nested to replace a group of files only
    after all of them were written.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open with 0o666 lets the umask decide the mode, as for a plainly written file
    # (tempfile.mkstemp would leave the saved model readable by its owner only).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_replace(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- safetensors


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identify an exact view: same memory, same layout. Tied weights share this key."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save tensors to a safetensors file, atomically, storing tied tensors once.

    safetensors refuses tensors that share memory. Exact aliases (the same memory seen
    with the same shape and strides, e.g. an LM head tied to an embedding) are stored
    once under the first name and recorded in the metadata, so :func:`load_safetensors`
    returns every name again. Other overlapping views are stored as independent copies.

    Args:
        state_dict: name -> tensor, on any device (copied to CPU for writing).
        path: destination file; replaced atomically.
        metadata: extra string metadata for the file header.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[tuple[Any, ...], str] = {}
    seen_storage: set[tuple[Any, int]] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a Tensor")
        tensor = tensor.detach()
        if tensor.numel() > 0:  # empty tensors have no memory to share
            key = _storage_key(tensor)
            if key in first_name:
                aliases[name] = first_name[key]
                continue
            first_name[key] = name
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            if storage in seen_storage:
                tensor = tensor.clone()  # overlapping but different view: store a copy
            seen_storage.add(storage)
        tensors[name] = tensor.contiguous().cpu()
    header = dict(metadata or {})
    header["format"] = "pt"
    if aliases:
        header[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    with atomic_replace(path) as tmp:
        save_file(tensors, tmp, metadata=header)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and header metadata; raise the documented errors."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(
            f"{path} is corrupt or truncated: it is not a valid safetensors file ({e})"
        ) from e
    return tensors, metadata


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file (written by :func:`save_safetensors` or any other writer).

    Tied tensors recorded by :func:`save_safetensors` come back under every name, as one
    shared tensor.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is corrupt or truncated, naming the file.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if _ALIASES_KEY in metadata:
        try:
            aliases = json.loads(metadata[_ALIASES_KEY])
            for alias, target in aliases.items():
                tensors[alias] = tensors[target]
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is corrupt: its tied-tensor metadata is invalid ({e})") from e
    return tensors


# --------------------------------------------------------------------------- pretrained models


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for a :class:`PretrainedMixin` model.

    Both files are written to temporary files first and renamed into place only when
    both are complete, so a failure leaves the previous save intact. Other files in the
    directory are left alone.

    ``state_dict`` replaces ``model.state_dict()`` as the weights: the full tensors a
    sharded (FSDP) model gathered, whose own state dict holds only this rank's shards.

    Returns:
        The directory, as a Path.
    """
    config = getattr(model, "config", None)
    config_class = getattr(type(model), "config_class", None)
    if config_class is None or not isinstance(config, config_class):
        raise ValueError(
            f"{type(model).__name__} must set the class attribute config_class and store an "
            f"instance of it as self.config; got config={type(config).__name__}"
        )
    payload = config.to_dict()
    for reserved in (_MODEL_TYPE_KEY, _VERSION_KEY):
        if reserved in payload:
            raise ValueError(
                f"{type(config).__name__} has a field named {reserved!r}, which config.json "
                "reserves; rename the field"
            )
    payload = {_MODEL_TYPE_KEY: type(model).__name__, _VERSION_KEY: FORMAT_VERSION, **payload}
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Nested: the config is renamed first, the weights last, and neither is renamed
    # unless both were written completely.
    with (
        atomic_replace(directory / WEIGHTS_NAME) as tmp_weights,
        atomic_replace(directory / CONFIG_NAME) as tmp_config,
    ):
        tmp_config.write_text(text, encoding="utf-8")
        save_safetensors(model.state_dict() if state_dict is None else state_dict, tmp_weights)
    return directory


def load_config_json(path: str | os.PathLike[str], model_type: str) -> dict[str, Any]:
    """Read a vats ``config.json`` and return the config fields (reserved keys removed).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, a newer format version, or another ``model_type``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt or truncated: it is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} is corrupt: expected a JSON object, got {type(data).__name__}")
    saved_type = data.pop(_MODEL_TYPE_KEY, None)
    if saved_type is None:
        raise ValueError(f"{path} has no {_MODEL_TYPE_KEY!r}: it was not written by vats")
    if saved_type != model_type:
        raise ValueError(
            f"{path} holds a {saved_type!r} model, which {model_type}.from_pretrained "
            f"cannot load; use {saved_type}.from_pretrained"
        )
    version = data.pop(_VERSION_KEY, None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has {_VERSION_KEY}={version!r}; this vats_core reads format versions "
            f"<= {FORMAT_VERSION} (upgrade vats-core to read newer checkpoints)"
        )
    return data


def _tied_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Names in a module's ``state_dict(keep_vars=True)`` that are one tensor (tied weights).

    Real tensors are compared by memory (:func:`_storage_key`); meta tensors have none (every
    meta tensor reports address 0), and a sharded DTensor (FSDP) has no storage of its own,
    so there the very same Parameter object is the tie.
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, t in state.items():
        if t.numel() > 0:
            by_object = t.is_meta or hasattr(t, "to_local")  # meta, or a DTensor
            key = ("object", id(t)) if by_object else _storage_key(t)
            groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _check_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike[str]
) -> dict[str, torch.Tensor]:
    """Fill in tied names the file stores once, then raise if ``tensors`` does not fit.

    Missing keys, unexpected keys and shape mismatches are all collected and reported in
    one ValueError. Nothing of the model is written.

    Returns:
        The model's ``state_dict(keep_vars=True)`` (its own Parameters and buffers).
    """
    expected = model.state_dict(keep_vars=True)
    for group in _tied_groups(expected):
        present = [n for n in group if n in tensors]
        if present:
            for name in group:
                tensors.setdefault(name, tensors[present[0]])
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if tensors[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_list_keys(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) {_list_keys(mismatched)}")
    if problems:
        raise ValueError(
            f"weights in {source} do not fit {type(model).__name__}: " + "; ".join(problems)
        )
    return expected


def check_pretrained_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike[str]
) -> None:
    """Raise the ValueError of :func:`load_pretrained_state` if ``tensors`` does not fit
    ``model`` (keys, shapes), without loading: for a loader of its own (a sharded model's).
    A tied weight the file stores under one name is filled in under its other names."""
    _check_state(model, tensors, source)


def load_pretrained_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str | os.PathLike[str]
) -> None:
    """Check ``tensors`` against ``model``'s state_dict, then copy them in (strict).

    Missing keys, unexpected keys and shape mismatches are all collected and reported
    in one ValueError before any parameter is written. A tied weight that the file
    stores under only one of its names is filled in from that name. The model keeps its
    own Parameters (an optimizer built on them stays valid): values are copied into them.
    """
    _check_state(model, tensors, source)
    model.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------- meta-device loading


class _SkipInitOnMeta(TorchFunctionMode):
    """Skips weight initialisation on meta tensors while a skeleton is built.

    Initialising a meta tensor computes nothing, but torch 2.10 runs ``uniform_`` /
    ``normal_`` on the meta device through its Python reference kernels, whose first
    shape check imports sympy: 5-8 s of a cold ``from_pretrained`` on a 2-core CPU, for
    values that are then replaced by the file's. ``torch.nn.init`` functions and the
    in-place fills and arithmetic they use (none changes a shape) return their meta tensor
    unchanged here; everything else runs.
    """

    _FILLS = frozenset(
        {
            torch.Tensor.uniform_,
            torch.Tensor.normal_,
            torch.Tensor.exponential_,
            torch.Tensor.bernoulli_,
            torch.Tensor.random_,
            # what init functions without a torch-function hook (trunc_normal_) do next
            torch.Tensor.erfinv_,
            torch.Tensor.mul_,
            torch.Tensor.add_,
            torch.Tensor.clamp_,
            torch.Tensor.fill_,
            torch.Tensor.zero_,
        }
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes it by name
        if (
            isinstance(target, torch.Tensor)
            and target.is_meta
            and (func in self._FILLS or getattr(func, "__module__", None) == "torch.nn.init")
        ):
            return target
        return func(*args, **kwargs)


#: Method a module may define to (re)create its non-persistent buffers (those its
#: ``state_dict`` leaves out, e.g. RoPE inverse frequencies) on the current default device.
#: :meth:`PretrainedMixin.from_pretrained` builds the model on the meta device and calls it,
#: under ``torch.device(target)``, on every module that defines it, after the weights are in.
INIT_BUFFERS_HOOK = "init_non_persistent_buffers"


def _split_name(name: str) -> tuple[str, str]:
    """``"blocks.0.attn.weight"`` -> ``("blocks.0.attn", "weight")``."""
    owner, _, attr = name.rpartition(".")
    return owner, attr


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called ``name`` (a dotted path)."""
    owner, attr = _split_name(name)
    tensor = getattr(model.get_submodule(owner), attr)
    assert isinstance(tensor, torch.Tensor)
    return tensor


def _non_persistent_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers the state_dict leaves out (``persistent=False``)."""
    saved = set(model.state_dict(keep_vars=True))
    return [n for n, _ in model.named_buffers(remove_duplicate=False) if n not in saved]


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Parameter/buffer names that are one tensor object (tied weights), first name first."""
    by_id: dict[int, list[str]] = {}
    for name, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _fill_buffers_from_a_real_build(
    model: nn.Module, build: Any, names: list[str], device: torch.device
) -> None:
    """Give ``model`` the named non-persistent buffers of a model built on ``device``.

    The fallback for modules without :data:`INIT_BUFFERS_HOOK`: their buffers are whatever
    the constructor computes, so the constructor runs once more, for real. It runs before
    the weights file is read and its model is dropped at once, so the process never holds
    its random weights and the file's together.
    """
    with torch.device(device):
        reference = build()
    for name in names:
        owner, attr = _split_name(name)
        setattr(model.get_submodule(owner), attr, reference.get_buffer(name))
    del reference


def _on_meta(model: nn.Module) -> list[str]:
    """Tensors of ``model`` still on the meta device: parameters, buffers, tensor attributes."""
    left = [
        n
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if t is not None and t.is_meta
    ]
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                left.append(f"{prefix}.{attr}" if prefix else attr)
    return left


def _convert_for_assign(
    tensors: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None,
) -> None:
    """Move and cast the file's tensors in place to what the model will hold.

    Each tensor takes ``dtype`` where given and its parameter or buffer is floating, else
    the dtype the constructor gave it (as the old copy into constructed weights did); one
    cast, so a float64 file loaded as float64 keeps every bit. Aliases (one
    tensor under several names) are converted once, so they stay one tensor. On CPU with
    matching dtypes ``Tensor.to`` returns the tensor itself: no copy is made.
    """
    names_by_tensor: dict[int, list[str]] = {}
    for name, t in tensors.items():
        names_by_tensor.setdefault(id(t), []).append(name)
    for names in names_by_tensor.values():
        t = tensors[names[0]]
        want = expected[names[0]].dtype
        if dtype is not None and want.is_floating_point:
            want = dtype
        t = t.to(device=device, dtype=want)
        for name in names:
            tensors[name] = t  # the file's original is freed once all its names point here


class PretrainedMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` to an ``nn.Module`` model.

    The model class sets ``config_class`` to its :class:`~vats_core.config.Config`
    subclass, is constructed as ``Model(config)`` and stores ``self.config``. Put the
    mixin first in the bases: ``class Model(PretrainedMixin, nn.Module)``.
    """

    config_class: ClassVar[type[Config]]
    config: Config

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` atomically.

        Returns:
            The directory, as a Path.
        """
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__} uses PretrainedMixin but is not an nn.Module")
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Build the model from ``directory`` (written by :meth:`save_pretrained`).

        The model is constructed on the meta device (shapes only, no memory, no random
        init), checked against the file, then given the file's tensors as its parameters
        and buffers (``load_state_dict(assign=True)``): the process holds one copy of the
        weights, not a random one plus the file's. Tied weights are tied again (one
        Parameter). Buffers the file does not hold (``persistent=False``) are created on
        ``device`` by the module's ``init_non_persistent_buffers()`` method
        (:data:`INIT_BUFFERS_HOOK`) where it has one; otherwise the constructor runs once
        more on ``device`` before the weights are read, and its buffers are kept. The
        model is cast and put in eval mode (call ``.train()`` to fine-tune).

        The constructor must run on the meta device: build modules and set up tensors,
        but read no tensor's values (no ``.item()``, ``.tolist()``).

        Args:
            directory: the saved model directory.
            device: where the model's tensors go; default CPU.
            dtype: floating dtype for parameters and floating buffers; default: the
                dtype the constructor gives (float32).

        Raises:
            FileNotFoundError: the directory, config.json or model.safetensors is missing.
            ValueError: a corrupt or truncated file, another ``model_type``, a config that
                fails validation, or weights that do not fit the config.
            RuntimeError: the model class cannot be built on the meta device, or leaves a
                tensor there that neither the file nor a hook fills.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory not found: {directory}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype={dtype!r} is invalid: expected a floating torch.dtype or None")
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"weights file not found: {weights_path}")
        fields = load_config_json(directory / CONFIG_NAME, cls.__name__)
        try:
            config = cls.config_class.from_dict(fields)
        except ValueError as e:
            e.add_note(f"while reading {directory / CONFIG_NAME}")
            raise
        target = torch.device(device if device is not None else "cpu")

        def build() -> nn.Module:
            model = cls(config)  # type: ignore[call-arg]
            assert isinstance(model, nn.Module)
            return model

        # 1. The skeleton: every parameter and buffer with its shape and dtype, no memory.
        try:
            with torch.device("meta"), _SkipInitOnMeta():
                model = build()
        except (NotImplementedError, RuntimeError) as e:
            raise RuntimeError(
                f"{cls.__name__}'s constructor cannot run on the meta device, which "
                f"from_pretrained builds on ({e}); it must not read tensor values"
            ) from e
        ties = _alias_groups(model)
        # 2. Buffers the file does not hold and no hook recreates: from a real build,
        #    done before the weights are read so that its weights and the file's never
        #    coexist.
        unhooked = [
            name
            for name in _non_persistent_buffers(model)
            if not callable(
                getattr(model.get_submodule(_split_name(name)[0]), INIT_BUFFERS_HOOK, None)
            )
        ]
        if unhooked:
            _fill_buffers_from_a_real_build(model, build, unhooked, target)
        # 3. Read and check everything before the model takes anything.
        tensors = load_safetensors(weights_path)
        expected = _check_state(model, tensors, weights_path)
        _convert_for_assign(tensors, expected, target, dtype)
        model.load_state_dict(tensors, strict=True, assign=True)
        del tensors, expected
        # assign=True wraps each tensor in a new Parameter, one per name: tie them again.
        for names in ties:
            shared = _get_tensor(model, names[0])
            for name in names[1:]:
                owner, attr = _split_name(name)
                setattr(model.get_submodule(owner), attr, shared)
        # 4. Non-persistent buffers the model's hooks create on the target device.
        with torch.device(target):
            for module in model.modules():
                hook = getattr(module, INIT_BUFFERS_HOOK, None)
                if callable(hook):
                    hook()
        left = _on_meta(model)
        if left:
            raise RuntimeError(
                f"{cls.__name__}.from_pretrained left tensor(s) on the meta device: "
                f"{_list_keys(left)}; register them as buffers (persistent, or recreated by "
                f"an {INIT_BUFFERS_HOOK}() method) so that loading can materialise them"
            )
        if dtype is not None:
            model.to(dtype=dtype)  # only the buffers made in steps 2 and 4 change
        model.eval()
        return model  # type: ignore[return-value]
