"""Config base: errors name field, value and what is allowed; dict/JSON round trips."""

from __future__ import annotations

import dataclasses
import enum
import json

import pytest

from vats_core.attention import AttentionConfig
from vats_core.block import BlockConfig
from vats_core.config import Config, check, check_positive, is_int, is_number
from vats_core.mlp import MLPConfig
from vats_core.moe import MoEConfig
from vats_core.parallel import ParallelConfig
from vats_core.rope import RopeConfig
from vats_core.testing import check_config, check_raises, config_classes, int_fields
from vats_core.training import TrainerConfig


class Act(enum.StrEnum):
    SILU = "silu"
    GELU = "gelu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inner(Config):
    width: int = 4
    act: Act = Act.SILU

    def __post_init__(self) -> None:
        check(self.width >= 1, self, "width", self.width, "an int >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outer(Config):
    n_heads: int = 4
    n_kv_heads: int = 2
    window: int | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)
    extra: Inner | None = None
    pattern: list[int | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        check(
            self.n_heads % self.n_kv_heads == 0,
            self,
            "n_kv_heads",
            self.n_kv_heads,
            f"a divisor of n_heads={self.n_heads}",
        )


def test_error_names_config_field_value_and_allowed():
    with pytest.raises(ValueError) as err:
        Outer(n_heads=4, n_kv_heads=3)
    msg = str(err.value)
    assert "Outer.n_kv_heads=3" in msg and "divisor of n_heads=4" in msg


def test_round_trip_through_json_rebuilds_nested_configs_and_enums():
    cfg = Outer(window=8, inner=Inner(width=2, act=Act.GELU), extra=Inner(), pattern=[None, 4])
    plain = json.loads(cfg.to_json())
    assert plain["inner"] == {"width": 2, "act": "gelu"}
    back = Outer.from_dict(plain)
    assert back == cfg
    assert isinstance(back.inner.act, Act)
    assert isinstance(back.extra, Inner)


def test_from_dict_rejects_unknown_fields_and_bad_enum_values():
    with pytest.raises(ValueError, match=r"no field\(s\) \['n_head'\]"):
        Outer.from_dict({"n_head": 4})
    with pytest.raises(ValueError, match=r"Inner.act='relu'.*\['silu', 'gelu'\]"):
        Inner.from_dict({"act": "relu"})
    with pytest.raises(ValueError, match="expects a mapping"):
        Outer.from_dict([1, 2])


def test_from_dict_validates_and_replace_revalidates():
    with pytest.raises(ValueError, match=r"Inner\.width=0"):
        Outer.from_dict({"inner": {"width": 0}})
    with pytest.raises(ValueError, match="n_kv_heads"):
        Outer().replace(n_kv_heads=3)
    assert Outer().replace(n_kv_heads=1).n_kv_heads == 1


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Outer().n_heads = 8  # type: ignore[misc]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Typed(Config):
    dim: int = 8
    scale: float = 1.0
    flag: bool = False
    name: str = "x"
    act: Act = Act.SILU
    window: int | None = None
    sizes: tuple[int, ...] = ()
    windows: tuple[int | None, ...] = ()
    inner: Inner = dataclasses.field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_positive(self, "dim", "scale", "window")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TypedChild(Typed):  # no __post_init__ of its own: the parent's value checks still run
    extra: int = 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dim", 64.0),
        ("dim", True),
        ("dim", "64"),
        ("dim", None),
        ("scale", False),
        ("scale", "1.0"),
        ("flag", 1),
        ("name", 3),
        ("act", "relu"),
        ("window", 2.5),
        ("sizes", 3),
        ("sizes", "abc"),
        ("sizes", [1, 2.0]),
        ("windows", [None, True]),
        ("inner", 4),
    ],
)
def test_wrong_types_raise_value_errors_naming_the_field(field, value):
    for cls in (Typed, TypedChild):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}.*=.*is invalid: expected"):
            cls(**{field: value})


def test_types_are_normalized_and_configs_hash():
    cfg = Typed(scale=2, act="gelu", sizes=[1, 2], windows=[None, 4], inner={"width": 3})
    assert cfg.scale == 2 and cfg.act is Act.GELU and cfg.inner == Inner(width=3)
    assert cfg.sizes == (1, 2) and cfg.windows == (None, 4)
    assert hash(cfg) == hash(Typed.from_dict(cfg.to_dict()))
    assert {cfg: 1}[Typed.from_dict(json.loads(cfg.to_json()))] == 1


def test_value_checks_run_after_type_checks_and_are_inherited():
    with pytest.raises(ValueError, match=r"Typed\.dim=0 is invalid: expected an int > 0$"):
        Typed(dim=0)
    with pytest.raises(
        ValueError, match=r"TypedChild\.window=-1 is invalid: expected None or an int"
    ):
        TypedChild(window=-1)
    with pytest.raises(ValueError, match=r"TypedChild\.extra=1.5 is invalid"):
        TypedChild(extra=1.5)
    with pytest.raises(ValueError, match=r"Typed\.scale=nan is invalid: expected a finite number"):
        Typed(scale=float("nan"))


def test_is_int_and_is_number():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(2.5) and not is_number(False) and not is_number("1")


# -- every vats-core config: hashes, round trips, int fields reject floats and bools ----------

_SELF = AttentionConfig(dim=16, n_heads=4, n_kv_heads=2, window=4, causal=True)
_CROSS = AttentionConfig(dim=16, n_heads=2, context_dim=8, dropout=0.1)
_MOE = MoEConfig(dim=16, hidden_dim=32, n_experts=4, n_shared_experts=1, capacity_factor=1.25)
EXAMPLES = {
    AttentionConfig: [_SELF, _CROSS],
    MLPConfig: [MLPConfig(dim=16, hidden_dim=32, activation="gelu")],
    MoEConfig: [_MOE],
    BlockConfig: [
        BlockConfig(attention=_SELF, mlp=MLPConfig(dim=16, hidden_dim=32)),
        BlockConfig(attention=_SELF, cross_attention=_CROSS, moe=_MOE, norm="layernorm"),
    ],
    RopeConfig: [RopeConfig(head_dim=12, n_axes=2, axes_dims=[8, 4], scaling="linear")],
    TrainerConfig: [
        TrainerConfig(),
        TrainerConfig(betas=[0.8, 0.9], grad_clip=None, sharded_checkpoints=True),
    ],
    ParallelConfig: [
        ParallelConfig(),
        ParallelConfig(data_parallel="fsdp", activation_checkpointing=True, compile=True),
    ],
}
CASES = [config for configs in EXAMPLES.values() for config in configs]


def test_every_core_config_class_has_examples():
    assert config_classes("vats_core") == sorted(EXAMPLES, key=lambda c: c.__qualname__)


@pytest.mark.parametrize("config", CASES, ids=lambda c: type(c).__name__)
def test_core_config_contract(config):
    """Hashes; dict and JSON round trips give an equal config with an equal hash; each int
    field rejects 64.0 and True naming the field (see check_config)."""
    check_config(config)


def test_int_fields_are_found_from_the_annotations():
    assert int_fields(MoEConfig) == [
        "dim",
        "hidden_dim",
        "n_experts",
        "top_k",
        "n_shared_experts",
        "shared_hidden_dim",
    ]


def test_check_config_catches_a_list_field():
    check_raises(lambda: check_config(Outer()), AssertionError, "Outer does not hash")


def test_sequence_fields_are_tuples_built_from_lists():
    assert RopeConfig(head_dim=12, n_axes=2, axes_dims=[8, 4]).axes_dims == (8, 4)
    assert TrainerConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
