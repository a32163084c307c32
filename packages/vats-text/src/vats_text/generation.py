"""Autoregressive generation outside the model (gpt-fast style): prefill, then decode through
the vats-core KV caches.

The model knows nothing of generation. :func:`generate` asks it for caches
(``model.setup_caches``), runs the whole prompt once (prefill), then feeds one token per step
back through the caches. Sliding-window layers get rolling caches, so KV memory stays
O(window) however long the generation; global layers get a static cache of
``prompt + max_new_tokens`` slots.

Batched prompts of different lengths are left-padded (``attention_mask`` False on the left,
as ``Tokenizer.encode_batch(..., padding_side="left")`` gives them): the model puts each row's
first real token at RoPE position 0 and the caches mask the padding, so each row generates
exactly what it would alone.

Per step the loop does the model's forward, the sampling of :mod:`vats_text.sampling`, and a
handful of small tensor ops; nothing in it scales with layers or experts. It reads the device
at most once per step, and only when some row can stop early (EOS or stop strings).
``compile=True`` runs the decode step through ``torch.compile`` (gpt-fast style). The
caches are built with fixed shapes (:mod:`vats_core.kv_cache`): every step attends over
whole buffers with the unwritten slots masked and writes at a tensor position, and the
static caches' capacity (prompt + ``max_new_tokens``, new for every request) is traced as a
dynamic size, so the step compiles once per batch size and never again, neither as the
caches fill and wrap nor for a new prompt length. It is one graph: the MoE's expert loop
runs on data-dependent sizes inside it. Inductor's C++ wrapper calls the kernels (less
per-kernel overhead than its Python wrapper). On CPU the first call compiles for 30-60 s;
the prefill stays eager.

Example:
    >>> from vats_text.generation import generate, stream
    >>> ids = tok.encode("def add(a, b):", add_bos=True)
    >>> out = generate(model, torch.tensor([ids]), max_new_tokens=32)  # greedy
    >>> print(tok.decode(out[0]))
    >>> for piece in stream(model, tok, "The", max_new_tokens=50, temperature=0.8, top_p=0.95):
    ...     print(piece, end="", flush=True)

Shapes: B batch rows, T prompt tokens (left padding included), N new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from vats_core.config import is_int
from vats_core.kv_cache import KVCaches, StaticKVCache
from vats_core.moe import COMPILE_SETTINGS
from vats_text.model import MoELanguageModel
from vats_text.sampling import SamplingConfig, sample_next_token

__all__ = ["TextTokenizer", "generate", "stream"]

# torch.compile backend of the decode step; tests swap in "eager" to check recompiles fast.
_COMPILE_BACKEND = "inductor"
# Dynamo settings under which the decode step is traced and run:
# - the caches' ``length`` is a Python int on a module that grows every step; dynamo
#   specializes such ints by default (one recompile per token until the recompile limit,
#   then silent eager fallback); unspecialized, it becomes one dynamic integer;
# - the MoE's expert loop splits tokens by per-expert counts read from the device; captured
#   as data-dependent sizes instead of constants, the step neither breaks its graph there
#   nor recompiles for every new routing pattern.
_DYNAMO_SETTINGS = {
    "allow_unspec_int_on_nn_module": True,
    # Module buffers (the caches' k/v/mask) may have dynamic sizes: see _mark_capacity_dynamic.
    # (Parameters keep their shapes: a model's weights never change size between steps.)
    "force_parameter_static_shapes": False,
    **COMPILE_SETTINGS,
}


class TextTokenizer(Protocol):
    """What :func:`stream` and stop strings need of a tokenizer (:class:`~vats_text.tokenizer.
    Tokenizer` is one). ``decode`` must be concatenative at character boundaries: decoding
    ``a + b`` gives ``decode(a) + decode(b)`` when ``a`` ends on a whole character."""

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ----------------------------------------------------------------------------- public API


def generate(
    model: MoELanguageModel,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    attention_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    tokenizer: TextTokenizer | None = None,
    compile: bool = False,
    inputs_embeds: Tensor | None = None,
) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Logits are processed in HF order (repetition penalty, temperature, top-k, top-p, min-p;
    see :mod:`vats_text.sampling`), then the token is the argmax (``temperature == 0``) or
    drawn with ``torch.multinomial``. A row stops after it emits an EOS id or its generated
    text contains a stop string; it is padded with ``model.config.pad_token_id`` (EOS if the
    model has no pad id) from then on. Generation ends when every row has stopped.

    The model should be in eval mode (``model.eval()``): this function does not change it.

    Args:
        model: the language model (any module with its ``forward(..., caches=...)``,
            ``setup_caches(batch_size, max_len, *, device, fixed_shape)`` and ``config``).
        input_ids: ``(B, T)`` integer prompt ids in ``[0, V)``, left-padded when the prompts
            differ in length. ``T == 0`` (empty prompts) starts every row from BOS; so does a
            row whose mask is all False.
        max_new_tokens: most tokens to add (>= 0).
        temperature: 0 = greedy; > 0 scales the logits and samples.
        top_k: keep the k most likely tokens (>= 1), or None.
        top_p: nucleus mass in (0, 1], or None.
        min_p: relative probability floor in [0, 1], or None.
        repetition_penalty: > 0; > 1 discourages tokens already in the prompt or output.
        eos_token_id: id(s) that end a row. None = ``model.config.eos_token_id``; an empty
            list = never stop on EOS (e.g. to generate exactly ``max_new_tokens``).
        stop_strings: text(s) that end a row once its generated text contains them (the token
            that completes one is kept). Needs ``tokenizer``.
        attention_mask: ``(B, T)`` bool or 0/1, True = real token; padding must be on the left.
            None = every token is real.
        generator: random source for sampling, on the model's device (seed it to reproduce).
        tokenizer: decodes generated ids to match ``stop_strings``.
        compile: run the one-token decode step through ``torch.compile`` (the prefill stays
            eager: it runs once).
        inputs_embeds: ``(B, T, D)`` embeddings the prefill reads instead of embedding
            ``input_ids`` (a multimodal model's text embeddings with image / audio features
            scattered in); ``input_ids`` still give the output's prompt columns and the
            repetition penalty's seen tokens. The decode steps embed their new tokens as usual,
            so media enter at prefill only and the KV caches serve them afterwards. Needs
            ``T >= 1`` and a real token in every row.

    Returns:
        ``(B, T' + N)`` long on the model's device: the prompt (``T' = T``, or 1 for empty
        prompts: the BOS) followed by the new tokens. ``N = max_new_tokens`` unless every row
        stopped earlier.

    Raises:
        ValueError: before any compute, for ids out of range, ``T + max_new_tokens`` beyond
            ``max_seq_len`` of a model with a global-attention layer, a sampling setting out of
            range (temperature < 0, top_p outside (0, 1], top_k < 1, min_p outside [0, 1],
            repetition_penalty <= 0), max_new_tokens < 0, an empty batch, a mask that is not
            left padding, stop_strings without tokenizer, a generator on another device, or
            inputs_embeds that do not match input_ids and the model.
    """
    plan = _plan(
        model,
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        ),
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        generator=generator,
        compile=compile,
        inputs_embeds=inputs_embeds,
    )
    b, t = plan.input_ids.shape
    # Preallocated output: each step writes one column, nothing is concatenated.
    out = torch.full((b, t + max_new_tokens), plan.pad_id, dtype=torch.long, device=plan.device)
    out[:, :t] = plan.input_ids
    n = 0
    for n, token_B in enumerate(_decode_tokens(model, plan), start=1):
        out[:, t + n - 1] = token_B
    return out if n == max_new_tokens else out[:, : t + n].contiguous()


def stream(
    model: MoELanguageModel,
    tokenizer: TextTokenizer,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    add_bos: bool = True,
    compile: bool = False,
    inputs_embeds: Tensor | None = None,
) -> Iterator[str]:
    """Generate from one text prompt and yield the new text as it is produced.

    Arguments are validated when this is called (not at the first ``next``). A piece is
    yielded once the decoded text is stable, i.e. does not end in the middle of a multi-byte
    character (U+FFFD), so the pieces never split a character; their concatenation equals
    ``tokenizer.decode`` of the generated ids (EOS and padding decode to nothing).

    Args:
        model: the language model (in eval mode).
        tokenizer: encodes ``prompt`` and decodes the output (e.g.
            :class:`~vats_text.tokenizer.Tokenizer`).
        prompt: the text to continue ("" = start from BOS), or its token ids (a list of
            ints, used as they are: ``add_bos`` does not apply).
        max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, eos_token_id,
            stop_strings, generator, compile: as in :func:`generate`.
        add_bos: prepend the BOS id to a text prompt.
        inputs_embeds: ``(1, T, D)`` embeddings of the prompt's T ids for the prefill, as in
            :func:`generate` (needs the prompt as ids).

    Returns:
        An iterator of text pieces.

    Raises:
        ValueError: as :func:`generate`, or if ``prompt`` is neither a string nor a list of
            ints.
    """
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_bos=add_bos)
    elif isinstance(prompt, Sequence) and all(is_int(i) for i in prompt):
        ids = list(prompt)
    else:
        raise ValueError(
            f"prompt must be a str or a list of token ids, got {type(prompt).__name__}"
        )
    if inputs_embeds is not None and isinstance(prompt, str):
        raise ValueError("inputs_embeds need the prompt as token ids (the ids they embed)")
    device = _model_device(model)
    plan = _plan(
        model,
        torch.tensor([ids], dtype=torch.long, device=device).reshape(1, len(ids)),
        attention_mask=None,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        ),
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        generator=generator,
        compile=compile,
        inputs_embeds=inputs_embeds,
    )
    return _stream_text(model, plan, tokenizer)


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass
class _Plan:
    """Everything validated and ready for the decode loop."""

    input_ids: Tensor  # (B, T) on the model's device (BOS inserted for empty prompts)
    attention_mask: Tensor | None  # (B, T) bool, None when no token is padding
    max_new_tokens: int
    sampling: SamplingConfig
    eos_ids: list[int]
    pad_id: int
    stops: _StopStrings | None
    generator: torch.Generator | None
    compile: bool
    device: torch.device
    inputs_embeds: Tensor | None = None  # (B, T, D) read by the prefill instead of input_ids


def _plan(
    model: MoELanguageModel,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None,
    max_new_tokens: int,
    sampling: SamplingConfig,
    eos_token_id: int | Sequence[int] | None,
    stop_strings: str | Sequence[str] | None,
    tokenizer: TextTokenizer | None,
    generator: torch.Generator | None,
    compile: bool,
    inputs_embeds: Tensor | None = None,
) -> _Plan:
    """Validate every argument (ValueError before any compute) and normalize the prompt."""
    cfg = model.config
    device = _model_device(model)
    if not is_int(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    eos_ids = _eos_ids(eos_token_id, cfg)
    stops = _StopStrings.build(stop_strings, tokenizer)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model on {device}: build it with "
                f"torch.Generator(device={str(device)!r})"
            )
    ids_shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else None
    input_ids, mask = _check_prompt(input_ids, attention_mask, cfg, device)
    if inputs_embeds is not None:
        _check_embeds(inputs_embeds, ids_shape, attention_mask, model)
    t = input_ids.shape[1]
    if cfg.has_global_layer and t + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {t} (left padding included) + max_new_tokens={max_new_tokens} = "
            f"{t + max_new_tokens} exceeds max_seq_len={cfg.max_seq_len} of a model with "
            "global-attention layers; shorten the prompt or max_new_tokens"
        )
    if compile and importlib.util.find_spec("setuptools") is None:
        raise ValueError(
            "compile=True runs torch.compile, whose CPU code generation needs setuptools: "
            "pip install setuptools (or pass compile=False)"
        )
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    return _Plan(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=eos_ids,
        pad_id=0 if pad_id is None else pad_id,
        stops=stops,
        generator=generator,
        compile=bool(compile),
        device=device,
        inputs_embeds=None if inputs_embeds is None else inputs_embeds.to(device),
    )


def _check_embeds(
    inputs_embeds: Tensor,
    ids_shape: tuple[int, ...] | None,
    attention_mask: Tensor | None,
    model: object,
) -> None:
    """ValueError unless ``inputs_embeds`` is ``(B, T, D)`` for the ``(B, T)`` prompt, in the
    model's dtype, with a real token in every row (the prefill cannot start a row from BOS
    without an embedding for it)."""
    weight = model.embed_tokens.weight  # type: ignore[attr-defined]
    assert ids_shape is not None  # _check_prompt accepted input_ids
    want = (*ids_shape, weight.shape[1])
    if not isinstance(inputs_embeds, Tensor) or tuple(inputs_embeds.shape) != want:
        got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, Tensor) else inputs_embeds
        raise ValueError(f"inputs_embeds must be (B, T, D) = {want} for input_ids, got {got}")
    if inputs_embeds.dtype != weight.dtype:
        raise ValueError(f"inputs_embeds is {inputs_embeds.dtype} but the model is {weight.dtype}")
    if want[1] == 0 or (
        attention_mask is not None and not bool(torch.as_tensor(attention_mask)[:, -1].all())
    ):
        raise ValueError(
            "inputs_embeds need a real token in every row (an empty prompt has no embedding "
            "to start from)"
        )


def _model_device(model: MoELanguageModel) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _eos_ids(eos_token_id: int | Sequence[int] | None, cfg: object) -> list[int]:
    vocab = cfg.vocab_size  # type: ignore[attr-defined]
    if eos_token_id is None:
        default = cfg.eos_token_id  # type: ignore[attr-defined]
        return [] if default is None else [default]
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if not isinstance(ids, Sequence) or isinstance(ids, str):
        raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {ids!r}")
    ids = list(ids)
    for i in ids:
        if not is_int(i) or not 0 <= i < vocab:
            raise ValueError(f"eos_token_id holds {i!r}, expected ids in [0, vocab_size={vocab})")
    return ids


def _check_prompt(
    input_ids: Tensor, attention_mask: Tensor | None, cfg: object, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Validate ids and mask; returns them on ``device`` with empty prompts set to BOS."""
    vocab = cfg.vocab_size  # type: ignore[attr-defined]
    bos = cfg.bos_token_id  # type: ignore[attr-defined]
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a (B, T) tensor, got {shape}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    b, t = input_ids.shape
    if b == 0:
        raise ValueError("input_ids is an empty batch (B = 0): give at least one prompt")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab)).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
        raise ValueError(f"input_ids holds {bad}, outside [0, vocab_size={vocab})")

    mask = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (b, t):
            shape = (
                tuple(attention_mask.shape)
                if isinstance(attention_mask, Tensor)
                else attention_mask
            )
            raise ValueError(f"attention_mask must be a (B, T) = ({b}, {t}) tensor, got {shape}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(
                f"attention_mask must be bool or 0/1 integers, got {attention_mask.dtype}"
            )
        if attention_mask.dtype != torch.bool:
            if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0/1 (or be bool)")
            attention_mask = attention_mask != 0
        mask = attention_mask.to(device)
        # Left padding: once a row's real tokens start they continue to the end, so the last
        # column is each row's latest real token and new tokens append right after it.
        if t > 1 and not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            raise ValueError(
                "attention_mask must be left padding (False only before a row's first real "
                "token); encode batches with padding_side='left'"
            )

    # Empty prompts start from BOS: T == 0 becomes one BOS column; a fully padded row gets a
    # BOS in its last (padding) slot, which left padding keeps adjacent to what it generates.
    empty_rows = t == 0 or (mask is not None and not bool(mask[:, -1].all()))
    if empty_rows and bos is None:
        raise ValueError("an empty prompt starts from BOS, but the model has no bos_token_id")
    if t == 0:
        input_ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
        mask = None
    elif mask is not None and empty_rows:
        input_ids, mask = input_ids.clone(), mask.clone()
        empty = ~mask[:, -1]
        input_ids[empty, -1] = bos
        mask[empty, -1] = True
    if mask is not None and bool(mask.all()):
        mask = None  # nothing padded: the model takes its unmasked fast paths
    return input_ids, mask


class _StopStrings:
    """Per-row matcher of stop strings in the generated text.

    Each step decodes only the last few tokens of each live row: a stop string of ``n`` UTF-8
    bytes that ends in the newest token spans at most ``n`` tokens (every non-special token
    decodes to >= 1 byte), so a window of ``n + 2`` tokens finds it the step it completes.
    """

    def __init__(self, strings: list[str], tokenizer: TextTokenizer) -> None:
        self.strings = strings
        self.tokenizer = tokenizer
        self.window = max(len(s.encode("utf-8")) for s in strings) + 2
        self.tails: list[list[int]] = []

    @classmethod
    def build(
        cls, stop_strings: str | Sequence[str] | None, tokenizer: TextTokenizer | None
    ) -> _StopStrings | None:
        if stop_strings is None:
            return None
        strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        if not isinstance(strings, Sequence) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(
                f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}"
            )
        if not strings:
            return None
        if tokenizer is None:
            raise ValueError(
                "stop_strings need a tokenizer to decode the generated ids: pass tokenizer="
            )
        for name in ("encode", "decode"):
            if not callable(getattr(tokenizer, name, None)):
                raise ValueError(
                    f"tokenizer must have an {name}() method, got {type(tokenizer).__name__}"
                )
        return cls(list(strings), tokenizer)

    def update(self, token_B: Tensor, finished_B: Tensor) -> Tensor:
        """Feed the step's tokens; returns ``finished_B`` with rows that just matched set."""
        tokens, done = token_B.tolist(), finished_B.tolist()  # the step's one device read
        if not self.tails:
            self.tails = [[] for _ in tokens]
        matched = []
        for row, (token, row_done) in enumerate(zip(tokens, done, strict=True)):
            if row_done:
                continue
            tail = self.tails[row]
            tail.append(token)
            del tail[: -self.window]
            text = self.tokenizer.decode(tail)
            if any(s in text for s in self.strings):
                matched.append(row)
        if not matched:
            return finished_B
        finished_B = finished_B.clone()
        finished_B[matched] = True
        return finished_B


# ----------------------------------------------------------------------------- decoding


def _decode_step(model: MoELanguageModel, token_B1: Tensor, caches: KVCaches) -> Tensor:
    """One token per row through the caches -> ``(B, V)`` next-token logits."""
    return model(token_B1, caches=caches, logits_to_keep=1).logits[:, -1]


@functools.cache
def _compiled_decode_step(
    backend: str, device_type: str
) -> Callable[[MoELanguageModel, Tensor, KVCaches], Tensor]:
    # One compiled wrapper per (backend, device type) for the whole process: dynamo caches the
    # traced graphs on the function's code, so later generate() calls reuse them. Inductor's
    # C++ wrapper saves the per-step Python overhead on the CPU; on CUDA it failed to build
    # (CppCompileError, torch 2.11 on an H200), so the default Python wrapper serves there.
    cpp = backend == "inductor" and device_type == "cpu"
    options = {"cpp_wrapper": True} if cpp else None
    return torch.compile(_decode_step, backend=backend, options=options)


def _mark_capacity_dynamic(caches: KVCaches) -> None:
    """Trace the static caches' capacity (prompt + max_new_tokens, new for every request) as
    a dynamic size: module buffers are otherwise specialized, one recompile per request size."""
    for cache in caches:
        if isinstance(cache, StaticKVCache):
            for buffer in (cache.k, cache.v):
                torch._dynamo.maybe_mark_dynamic(buffer, 2)  # (B, Hkv, L, Dh)
            torch._dynamo.maybe_mark_dynamic(cache.mask, 1)  # (B, L)


def _decode_tokens(model: MoELanguageModel, plan: _Plan) -> Iterator[Tensor]:
    """Prefill, then yield each step's ``(B,)`` new tokens (pad for rows that stopped)."""
    if plan.max_new_tokens == 0:
        return
    ids_BT, mask_BT = plan.input_ids, plan.attention_mask
    b, t = ids_BT.shape
    vocab = model.config.vocab_size
    sampling = plan.sampling
    with torch.no_grad():
        kind = torch.device(plan.device).type
        # Under autocast the keys and values come out in the autocast dtype, not the weights'.
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        caches = model.setup_caches(
            b, t + plan.max_new_tokens, device=plan.device, dtype=dtype, fixed_shape=plan.compile
        )
        seen_BV = None
        if sampling.repetition_penalty != 1.0:
            # Tokens present in each row's real prompt (padding excluded).
            real_BT = (
                torch.ones_like(ids_BT, dtype=torch.int32) if mask_BT is None else mask_BT.int()
            )
            counts = torch.zeros(b, vocab, dtype=torch.int32, device=plan.device)
            seen_BV = counts.scatter_add_(1, ids_BT, real_BT) > 0
        eos = torch.tensor(plan.eos_ids, dtype=torch.long, device=plan.device)
        can_stop = bool(plan.eos_ids) or plan.stops is not None
        finished_B = torch.zeros(b, dtype=torch.bool, device=plan.device)
        if plan.stops is not None:
            plan.stops.tails = []
        step = _decode_step
        if plan.compile:
            step = _compiled_decode_step(_COMPILE_BACKEND, kind)
            _mark_capacity_dynamic(caches)

        if plan.inputs_embeds is None:
            out = model(ids_BT, attention_mask=mask_BT, caches=caches, logits_to_keep=1)
        else:  # (only then: a model without an inputs_embeds argument still generates)
            out = model(
                inputs_embeds=plan.inputs_embeds,
                attention_mask=mask_BT,
                caches=caches,
                logits_to_keep=1,
            )
        logits_BV = out.logits[:, -1]
        for i in range(plan.max_new_tokens):
            token_B = sample_next_token(
                logits_BV, sampling, seen=seen_BV, generator=plan.generator
            ).masked_fill(finished_B, plan.pad_id)
            if seen_BV is not None:
                seen_BV.scatter_(1, token_B[:, None], True)
            if plan.eos_ids:
                finished_B = finished_B | torch.isin(token_B, eos)
            if plan.stops is not None:
                finished_B = plan.stops.update(token_B, finished_B)
            yield token_B
            if i + 1 == plan.max_new_tokens or (can_stop and bool(finished_B.all())):
                return
            if plan.compile:
                with torch._dynamo.config.patch(**_DYNAMO_SETTINGS):
                    logits_BV = step(model, token_B[:, None], caches)
            else:
                logits_BV = step(model, token_B[:, None], caches)


class _IncrementalText:
    """Turns a growing list of ids into text pieces that never split a character.

    Decodes only the ids since the last stable point (two offsets, as in HF TGI's incremental
    detokenization), so a long stream costs O(tokens), not O(tokens²).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the ids decoded for context
        self.read = 0  # end of the ids whose text was already yielded

    def push(self, token: int) -> str:
        self.ids.append(token)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done) :]
        return ""

    def flush(self) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(done) :]


def _stream_text(model: MoELanguageModel, plan: _Plan, tokenizer: TextTokenizer) -> Iterator[str]:
    pieces = _IncrementalText(tokenizer)
    for token_B in _decode_tokens(model, plan):
        piece = pieces.push(int(token_B[0]))
        if piece:
            yield piece
    rest = pieces.flush()
    if rest:
        yield rest
