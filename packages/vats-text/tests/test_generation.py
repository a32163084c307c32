"""vats_text.generation: cached generation equals naive full forwards, left padding, rolling
caches, stopping, streaming, and every bad input."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from vats_core.kv_cache import KVCaches, RollingKVCache, StaticKVCache
from vats_core.testing import check_raises
from vats_text.corpus import load_corpus
from vats_text.generation import generate, stream
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset
from vats_text.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

V = 512  # tiny preset vocabulary


def _model(**overrides) -> MoELanguageModel:
    torch.manual_seed(0)
    return MoELanguageModel(lm_preset("tiny", **overrides)).eval()


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(7, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _naive_greedy(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Re-run the full forward (no cache) for every new token."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def _left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # 0/1 like HF tokenizers
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


# --------------------------------------------------------------- cached == naive


def test_greedy_equals_naive_loop_batch1():
    """tiny mixes window-16 and global layers; 40 new tokens run far past the window."""
    model = _model()
    ids = _ids(1, 9)
    out = generate(model, ids, max_new_tokens=40, eos_token_id=[])
    assert out.shape == (1, 49) and out.dtype == torch.long
    assert torch.equal(out, _naive_greedy(model, ids, 40))


def test_left_padded_batch_rows_equal_their_own_runs():
    model = _model()
    rows = [_ids(1, n, seed=n)[0] for n in (12, 3, 7)]
    ids, mask = _left_pad(rows)
    out = generate(model, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert out.shape == (3, 12 + 20)
    assert torch.equal(out[:, :12], ids)  # prompt (and its padding) kept as given
    for i, row in enumerate(rows):
        alone = _naive_greedy(model, row[None], 20)[0, len(row) :]
        assert torch.equal(out[i, 12:], alone), f"row {i}"
    # A bool mask gives the same.
    out_bool = generate(model, ids, attention_mask=mask.bool(), max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out_bool, out)


def test_all_windowed_model_runs_past_max_seq_len_with_o_window_caches(monkeypatch):
    """Rolling caches: exact past the window, memory independent of the length generated."""
    model = _model(layer_windows=[4, 6, 4], max_seq_len=16)
    made: list[KVCaches] = []
    setup = model.setup_caches

    def spy(*args, **kwargs):
        made.append(setup(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(model, "setup_caches", spy)
    ids = _ids(2, 5)
    out = generate(model, ids, max_new_tokens=40, eos_token_id=[])  # 45 > max_seq_len = 16
    assert torch.equal(out, _naive_greedy(model, ids, 40))
    generate(model, ids, max_new_tokens=120, eos_token_id=[])

    def kv_bytes(caches: KVCaches) -> int:
        return sum(b.numel() * b.element_size() for b in caches.buffers())

    assert all(isinstance(c, RollingKVCache) for c in made[0])
    assert [c.capacity for c in made[0]] == [3, 5, 3]  # window - 1 slots each
    assert kv_bytes(made[0]) == kv_bytes(made[1])  # 45 vs 125 tokens: same KV memory
    assert made[1].length == 5 + 119  # it did decode all of them


def test_global_layer_caches_are_sized_to_the_request(monkeypatch):
    model = _model()
    made: list[KVCaches] = []
    setup = model.setup_caches
    monkeypatch.setattr(
        model, "setup_caches", lambda *a, **k: made.append(setup(*a, **k)) or made[-1]
    )
    generate(model, _ids(1, 6), max_new_tokens=10, eos_token_id=[])
    assert isinstance(made[0][1], StaticKVCache) and made[0][1].capacity == 16


def test_max_new_tokens_zero_returns_prompt():
    model = _model()
    ids = _ids(2, 4)
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


# ---------------------------------------------------------------------- BOS


def test_empty_prompt_starts_from_bos():
    model = _model()
    out = generate(model, torch.empty(2, 0, dtype=torch.long), max_new_tokens=6, eos_token_id=[])
    assert out.shape == (2, 7)
    bos = torch.full((1, 1), BOS_ID)
    expected = _naive_greedy(model, bos, 6)
    assert torch.equal(out, expected.expand(2, -1))


def test_fully_padded_row_starts_from_bos():
    model = _model()
    ids, mask = _left_pad([_ids(1, 5)[0], torch.empty(0, dtype=torch.long)])
    out = generate(model, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    bos_run = _naive_greedy(model, torch.full((1, 1), BOS_ID), 6)
    assert out[1, 4] == BOS_ID and torch.equal(out[1, 5:], bos_run[0, 1:])
    assert torch.equal(out[0], _naive_greedy(model, ids[:1], 6)[0])


# ----------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = _model()
    ids = _ids(2, 6)
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_k=100, top_p=0.95, min_p=0.01)
    a = generate(model, ids, generator=torch.Generator().manual_seed(3), eos_token_id=[], **kwargs)
    b = generate(model, ids, generator=torch.Generator().manual_seed(3), eos_token_id=[], **kwargs)
    c = generate(model, ids, generator=torch.Generator().manual_seed(4), eos_token_id=[], **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :6], ids)


def test_top_k_one_sampling_equals_greedy():
    model = _model()
    ids = _ids(2, 6)
    greedy = generate(model, ids, max_new_tokens=15, eos_token_id=[])
    sampled = generate(
        model, ids, max_new_tokens=15, temperature=1.5, top_k=1, eos_token_id=[], generator=None
    )
    assert torch.equal(greedy, sampled)


def test_strong_repetition_penalty_never_repeats():
    model = _model()
    ids = _ids(1, 8)
    out = generate(model, ids, max_new_tokens=30, repetition_penalty=1e4, eos_token_id=[])
    new = out[0, 8:].tolist()
    assert len(set(new)) == len(new) and not set(new) & set(ids[0].tolist())


# ------------------------------------------------------- a scripted model to stop


class _ScriptedLM(nn.Module):
    """Emits ``script[row][k]`` as its k-th generated token (one-hot logits): lets the tests
    choose exactly which tokens come out, through the real cache protocol."""

    def __init__(self, script: list[list[int]], vocab: int = 300) -> None:
        super().__init__()
        self.script = torch.tensor(script)
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(
            vocab_size=vocab,
            max_seq_len=1024,
            has_global_layer=True,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        )
        self.calls = 0

    def setup_caches(self, batch_size, max_len, *, device=None, dtype=None, fixed_shape=False):
        self.calls = 0
        return KVCaches.for_layers(
            [None],
            batch_size=batch_size,
            max_len=max_len,
            n_kv_heads=1,
            head_dim=2,
            fixed_shape=fixed_shape,
        )

    def forward(self, input_ids, *, attention_mask=None, caches=None, logits_to_keep=0):
        b, t = input_ids.shape
        caches[0].update(torch.zeros(b, 1, t, 2), torch.zeros(b, 1, t, 2), attention_mask)
        logits = torch.zeros(b, 1, self.config.vocab_size)
        logits[torch.arange(b), 0, self.script[:, self.calls]] = 10.0
        self.calls += 1
        return types.SimpleNamespace(logits=logits)


class _ByteTokenizer:
    """ids 7..262 are the bytes 0..255 (like the vats tokenizer's byte pieces); others -> ""."""

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return [BOS_ID] * add_bos + [b + 7 for b in text.encode()] + [EOS_ID] * add_eos

    def decode(self, ids) -> str:
        return bytes(i - 7 for i in ids if 7 <= i < 263).decode("utf-8", errors="replace")


def _bytes(text: str) -> list[int]:
    return _ByteTokenizer().encode(text)


def test_eos_stops_rows_and_pads_them():
    script = [
        [*_bytes("ab"), EOS_ID, *_bytes("zzzzz")],
        [*_bytes("abcd"), EOS_ID, *_bytes("zzz")],
        _bytes("abcdefgh"),
    ]
    out = generate(_ScriptedLM(script), torch.full((3, 1), BOS_ID), max_new_tokens=8)
    assert out[0, 1:].tolist() == [*_bytes("ab"), EOS_ID] + [PAD_ID] * 5
    assert out[1, 1:].tolist() == [*_bytes("abcd"), EOS_ID] + [PAD_ID] * 3
    assert out[2, 1:].tolist() == _bytes("abcdefgh")
    # Every row stops early: the output ends with the last row's EOS.
    out = generate(_ScriptedLM(script[:2]), torch.full((2, 1), BOS_ID), max_new_tokens=8)
    assert out.shape == (2, 6) and out[0, -2:].tolist() == [PAD_ID, PAD_ID]
    # Several EOS ids, or none.
    out = generate(_ScriptedLM(script), torch.full((3, 1), BOS_ID), max_new_tokens=8,
                   eos_token_id=[_bytes("c")[0], EOS_ID])  # fmt: skip
    # (every row now stops within 3 tokens: "ab" + EOS, "abc", "abc")
    assert out[:, 1:].tolist() == [[*_bytes("ab"), EOS_ID], _bytes("abc"), _bytes("abc")]
    out = generate(_ScriptedLM(script), torch.full((3, 1), BOS_ID), max_new_tokens=8,
                   eos_token_id=[])  # fmt: skip
    assert out[:, 1:].tolist() == script


def test_stop_strings_stop_rows_and_pad_them():
    script = [_bytes("say hi\nbye, ok"), _bytes("no stop here!!"), _bytes("x€END then more")[:14]]
    tok = _ByteTokenizer()
    out = generate(
        _ScriptedLM(script),
        torch.full((3, 1), BOS_ID),
        max_new_tokens=14,
        stop_strings=["\nbye", "€E"],
        tokenizer=tok,
        eos_token_id=[],
    )
    assert tok.decode(out[0].tolist()) == "say hi\nbye"
    assert out[0, 11:].tolist() == [PAD_ID] * 4
    assert tok.decode(out[1].tolist()) == "no stop here!!"
    # "€" is 3 byte tokens: the stop string spans 4 tokens and ends on "E".
    assert tok.decode(out[2].tolist()) == "x€E" and out[2, 6:].tolist() == [PAD_ID] * 9


def test_stream_never_splits_a_character():
    text = "é€🎉a" + "ß" * 3
    model, tok = _ScriptedLM([[*_bytes(text), EOS_ID]]), _ByteTokenizer()
    pieces = list(stream(model, tok, "", max_new_tokens=30))
    assert pieces == ["é", "€", "🎉", "a", "ß", "ß", "ß"]
    # A truncated character at the very end still comes out (as the decoder renders it).
    model = _ScriptedLM([[*_bytes("a€")[:3], EOS_ID]])
    assert "".join(stream(model, tok, "", max_new_tokens=5)) == "a\ufffd"


def test_stream_stops_on_stop_string():
    model, tok = _ScriptedLM([_bytes("one. two. three.")]), _ByteTokenizer()
    assert "".join(stream(model, tok, "hi", max_new_tokens=16, stop_strings=". t")) == "one. t"


def test_prefill_embeddings_replace_the_prompt_embedding():
    """inputs_embeds of the ids themselves change nothing; other embeddings (spliced media)
    change the continuation, which then reads them from the caches only."""
    model = _model()
    rows = [_ids(1, n, seed=n)[0] for n in (9, 4)]
    ids, mask = _left_pad(rows)
    embeds = model.embed_tokens(ids).detach()
    plain = generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    same = generate(
        model, ids, attention_mask=mask, inputs_embeds=embeds, max_new_tokens=12, eos_token_id=[]
    )
    assert torch.equal(plain, same)
    # Row 1's first real token replaced by a foreign vector: equal to a naive loop that feeds
    # the same embeddings every step (no cache).
    spliced = embeds.clone()
    spliced[1, -4] = torch.randn(spliced.shape[-1], generator=torch.Generator().manual_seed(3))
    got = generate(
        model, ids, attention_mask=mask, inputs_embeds=spliced, max_new_tokens=12, eos_token_id=[]
    )
    want = []
    with torch.no_grad():
        row = spliced[1:, -4:]
        for _ in range(12):
            nxt = model(inputs_embeds=row).logits[:, -1].argmax(-1)
            row = torch.cat([row, model.embed_tokens(nxt)[:, None]], dim=1)
            want.append(int(nxt))
    assert got[1, 9:].tolist() == want
    assert torch.equal(got[0], plain[0])  # the other row is untouched


def test_prefill_embeddings_are_checked_before_compute(guarded):
    ids = _ids(2, 4)
    embeds = torch.zeros(2, 4, guarded.config.dim)
    for kwargs, match in [
        (dict(inputs_embeds=embeds[:, :3]), r"\(B, T, D\)"),
        (dict(inputs_embeds=embeds.double()), "float64"),
        (dict(inputs_embeds=embeds, attention_mask=torch.tensor([[0, 0, 0, 0], [1] * 4])), "real"),
    ]:
        check_raises(
            lambda kw=kwargs: generate(guarded, ids, max_new_tokens=2, **kw), ValueError, match
        )


@pytest.fixture(scope="module")
def real_tok() -> Tokenizer:
    return Tokenizer.train(load_corpus("train", max_files=40), vocab_size=V)


def test_stream_concatenation_equals_decode_of_generate(real_tok):
    """A random model emits byte pieces that often form invalid or partial UTF-8."""
    model = _model()
    kwargs = dict(max_new_tokens=60, temperature=1.0, eos_token_id=[])
    pieces = list(
        stream(
            model, real_tok, "The value of", generator=torch.Generator().manual_seed(1), **kwargs
        )
    )
    prompt = torch.tensor([real_tok.encode("The value of", add_bos=True)])
    out = generate(model, prompt, generator=torch.Generator().manual_seed(1), **kwargs)
    assert "".join(pieces) == real_tok.decode(out[0, prompt.shape[1] :])
    assert all(p for p in pieces) and all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_stream_takes_ids_and_prefill_embeddings(real_tok):
    model = _model()
    ids = real_tok.encode("The value of", add_bos=True)
    embeds = model.embed_tokens(torch.tensor([ids])).detach()
    kwargs = dict(max_new_tokens=20, eos_token_id=[])
    by_text = "".join(stream(model, real_tok, "The value of", **kwargs))
    by_ids = "".join(stream(model, real_tok, ids, inputs_embeds=embeds, **kwargs))
    assert by_text == by_ids
    check_raises(
        lambda: stream(model, real_tok, "text", inputs_embeds=embeds, **kwargs),
        ValueError,
        "token ids",
    )


def test_stop_strings_with_real_tokenizer(real_tok):
    model = _model()
    prompt = torch.tensor([real_tok.encode("x", add_bos=True)])
    full = generate(model, prompt, max_new_tokens=30, eos_token_id=[])[0, 2:].tolist()
    # A stop string that first completes at generated token k (chosen from the greedy text).
    k = next(i for i in range(3, 30) if len(real_tok.decode(full[: i + 1])) > 3)
    stop = real_tok.decode(full[: k + 1])[-3:]
    first = next(i for i in range(30) if stop in real_tok.decode(full[: i + 1]))
    out = generate(
        model, prompt, max_new_tokens=30, eos_token_id=[], stop_strings=[stop], tokenizer=real_tok
    )
    assert out[0, 2:].tolist() == full[: first + 1]  # stopped, and nothing left to pad


# ------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def guarded() -> MoELanguageModel:
    """A model that fails the test if it is ever run (errors must come before compute)."""
    model = _model()
    model.register_forward_pre_hook(lambda *_: pytest.fail("forward ran before the ValueError"))
    return model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_ids=torch.tensor([[5, V]])), "outside"),
        (dict(input_ids=torch.tensor([[-1, 5]])), "outside"),
        (dict(input_ids=torch.tensor([[5.0, 6.0]])), "integer"),
        (dict(input_ids=torch.tensor([5, 6])), r"\(B, T\)"),
        (dict(input_ids=torch.empty(0, 4, dtype=torch.long)), "empty batch"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=2.0), "max_new_tokens"),
        (dict(max_new_tokens=256), "max_seq_len"),  # 4 + 256 > 256, tiny has a global layer
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.2), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(eos_token_id=V), "eos_token_id"),
        (dict(stop_strings=["\n"]), "tokenizer"),
        (dict(stop_strings=[""], tokenizer=_ByteTokenizer()), "stop_strings"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 0]] * 2)), "left padding"),
        (dict(attention_mask=torch.ones(2, 3)), r"\(B, T\)"),
        (dict(attention_mask=torch.ones(2, 4)), "bool or 0/1"),
        (dict(attention_mask=torch.full((2, 4), 2)), "0/1"),
        (dict(generator=42), "generator"),
    ],
)
def test_bad_input_raises_before_compute(guarded, kwargs, match):
    args = dict(input_ids=_ids(2, 4), max_new_tokens=4) | kwargs
    check_raises(lambda: generate(guarded, **args), ValueError, match)


def test_stream_bad_input_raises_at_call(guarded):
    tok = _ByteTokenizer()
    check_raises(lambda: stream(guarded, tok, "hi", max_new_tokens=4, top_k=0), ValueError, "top_k")
    check_raises(lambda: stream(guarded, tok, 3, max_new_tokens=4), ValueError, "prompt")


def test_windowed_model_has_no_length_limit_but_global_one_does():
    windowed = _model(layer_windows=[4, 4, 4], max_seq_len=8)
    assert generate(windowed, _ids(1, 6), max_new_tokens=10, eos_token_id=[]).shape == (1, 16)
    check_raises(
        lambda: generate(_model(max_seq_len=8), _ids(1, 6), max_new_tokens=3),
        ValueError,
        "max_seq_len=8",
    )


def test_generate_under_autocast_caches_in_the_autocast_dtype():
    """Keys and values come out bf16 under autocast: the caches take that dtype (an fp32
    cache refused them, seen on an H200), and decoding still equals the naive loop."""
    model, ids = _model(), _ids(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, ids, max_new_tokens=4)
        assert torch.equal(out, _naive_greedy(model, ids, 4))
