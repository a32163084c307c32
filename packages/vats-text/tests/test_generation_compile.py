"""generate(compile=True): the compiled decode step gives eager's tokens and, once warm, never
recompiles (checked with torch.compiler.set_stance("fail_on_recompile"))."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from vats_text import generation
from vats_text.generation import generate
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset


def _model() -> MoELanguageModel:
    torch.manual_seed(0)
    # Windows of 6: the rolling caches wrap during warm-up; one global layer.
    return MoELanguageModel(lm_preset("tiny", layer_windows=[6, None, 6])).eval()


def _ids(b: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(7, 512, (b, t), generator=torch.Generator().manual_seed(seed))


def _check_no_recompiles_once_warm(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "_COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    model = _model()
    # Warm-up: one request traces every layer kind, the caches' growth and the rolling
    # caches' wrap-around (window 6, 17 tokens).
    ids = _ids(2, 5, 1)
    compiled = generate(model, ids, max_new_tokens=12, eos_token_id=[], compile=True)
    assert torch.equal(compiled, generate(model, ids, max_new_tokens=12, eos_token_id=[]))
    frames = counters["frames"]["total"]
    # New prompt lengths, new cache sizes and long generations: any recompile raises.
    for t, n, seed in ((7, 14, 2), (9, 40, 3)):
        ids = _ids(2, t, seed)
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled = generate(model, ids, max_new_tokens=n, eos_token_id=[], compile=True)
        assert torch.equal(compiled, generate(model, ids, max_new_tokens=n, eos_token_id=[]))
    assert counters["frames"]["total"] == frames


def test_compiled_decode_no_recompiles_dynamo(monkeypatch):
    """Dynamo alone (eager backend): the guards and recompiles are dynamo's, so this is fast."""
    _check_no_recompiles_once_warm("eager", monkeypatch)


@pytest.mark.slow
def test_compiled_decode_no_recompiles_inductor(monkeypatch):
    _check_no_recompiles_once_warm("inductor", monkeypatch)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_is_one_graph(batch):
    # No graph breaks: RoPE, the attention dispatch (its backend region included) and the
    # MoE's data-dependent expert grouping (one token's views, a few rows' grouped_mm) all
    # trace; a break would send part of every step back to eager Python.
    torch._dynamo.reset()
    model = _model()
    ids = _ids(batch, 5, 4)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding on the first row
    caches = model.setup_caches(batch, 16)
    with torch.no_grad():
        model(ids, attention_mask=mask, caches=caches)
        explained = torch._dynamo.explain(generation._decode_step)(model, ids[:, :1], caches)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
