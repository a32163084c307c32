"""vats-core: the layers every vats model is built from.

Attention with GQA, sliding windows and pluggable kernels (:mod:`vats_core.attention`),
RoPE in 1D/2D/3D (:mod:`vats_core.rope`), KV caches (:mod:`vats_core.kv_cache`),
Mixture of Experts (:mod:`vats_core.moe`), norms and MLPs, the pre-norm
:class:`TransformerBlock` and the divided space / time :class:`FactorizedBlock` (video),
config dataclasses (:mod:`vats_core.config`), checkpoint I/O (:mod:`vats_core.checkpoint`),
the trainer (:mod:`vats_core.training`) and the shared model-contract checks
(:mod:`vats_core.testing`).
"""

from vats_core.attention import (
    Attention,
    AttentionBackend,
    AttentionConfig,
    attention,
    attention_backend,
)
from vats_core.block import BlockConfig, FactorizedBlock, TransformerBlock
from vats_core.checkpoint import PretrainedMixin
from vats_core.config import Config, check
from vats_core.inference import FrozenModel, compile_frozen
from vats_core.kv_cache import KVCaches, RollingKVCache, StaticKVCache
from vats_core.mlp import Activation, MLPConfig
from vats_core.moe import MoE, MoEConfig, RouterStats
from vats_core.norms import LayerNorm, NormType, RMSNorm
from vats_core.rope import RopeConfig, RopeScaling, RotaryEmbedding

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "Attention",
    "AttentionBackend",
    "AttentionConfig",
    "BlockConfig",
    "Config",
    "FactorizedBlock",
    "FrozenModel",
    "KVCaches",
    "LayerNorm",
    "MLPConfig",
    "MoE",
    "MoEConfig",
    "NormType",
    "PretrainedMixin",
    "RMSNorm",
    "RollingKVCache",
    "RopeConfig",
    "RopeScaling",
    "RotaryEmbedding",
    "RouterStats",
    "StaticKVCache",
    "TransformerBlock",
    "attention",
    "attention_backend",
    "check",
    "compile_frozen",
]
