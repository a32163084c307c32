"""generate(compile=True): the compiled decode step gives eager's tokens, compiles once per
batch size and never recompiles: not as the caches fill or the rolling caches wrap, not for
new prompt lengths or cache sizes (checked with torch.compiler.set_stance
("fail_on_recompile"))."""

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


def _check_compiles_once(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "_COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    model = _model()
    frames = counters["frames"]["total"]

    def check(t: int, n: int, seed: int) -> None:
        ids = _ids(2, t, seed)
        compiled = generate(model, ids, max_new_tokens=n, eos_token_id=[], compile=True)
        assert torch.equal(compiled, generate(model, ids, max_new_tokens=n, eos_token_id=[]))

    # The first request compiles the step, once: its caches fill and the rolling caches
    # (window 6) wrap within its 17 tokens.
    check(5, 12, 1)
    assert counters["frames"]["total"] - frames == 1
    # New prompt lengths, new cache sizes and long generations: any recompile raises.
    with torch.compiler.set_stance("fail_on_recompile"):
        check(7, 14, 2)
        check(9, 40, 3)
    assert counters["frames"]["total"] - frames == 1


def test_compiled_decode_no_recompiles_dynamo(monkeypatch):
    """Dynamo alone (eager backend): the guards and recompiles are dynamo's, so this is fast."""
    _check_compiles_once("eager", monkeypatch)


@pytest.mark.slow
def test_compiled_decode_no_recompiles_inductor(monkeypatch):
    _check_compiles_once("inductor", monkeypatch)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_is_one_graph(batch):
    # No graph breaks: RoPE, the attention dispatch (its backend region included), the
    # fixed-shape cache updates and the MoE's expert loop on data-dependent sizes all trace;
    # a break would send part of every step back to eager Python.
    torch._dynamo.reset()
    model = _model()
    ids = _ids(batch, 5, 4)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding on the first row
    caches = model.setup_caches(batch, 16, fixed_shape=True)
    with torch.no_grad(), torch._dynamo.config.patch(**generation._DYNAMO_SETTINGS):
        model(ids, attention_mask=mask, caches=caches)
        explained = torch._dynamo.explain(generation._decode_step)(model, ids[:, :1], caches)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
