"""Multimodal LM answering an image question: time to first token, decode tokens/s, floor.

The demo-sized :class:`vats_apps.multimodal.MultimodalLM` (LLaVA-style, Liu et al. 2023,
arXiv:2304.08485) with random weights (speed does not depend on training): the ``small`` LM
preset (4k vocabulary, dim 192, 4 layers, 4 experts top-2), the ViT-2D of
``configs/model/vision2d/shapes.yaml`` for 24 px images (patch 4, dim 96, 4 layers; 36 patch
tokens an image) and a LLaVA projector (96 -> 192). The tokenizer is BPE trained on the
first 40 files of the stdlib corpus. The question, at batch 1 and batch 8 (one random image
in [-1, 1] a row, each row its own image)::

    build_inputs(model, tok, ["<image>\\nWhat colour is the shape?\\n"] * B, images=...)

fp32 on CPU, 2 threads. Every answer runs ``model.embed`` (encoder + projector + scatter into
the token embeddings) and :func:`vats_text.generation.generate` on it, which is what
``MultimodalLM.generate`` does, with ``eos_token_id=[]`` so that every call makes exactly the
tokens asked for (random weights may emit EOS; ``MultimodalLM.generate`` has no EOS
argument). The compiled contender's greedy tokens are checked to equal the eager ones
before anything is timed (the script exits non-zero otherwise).

Figures, for each batch size, from one alternation of the contenders (medians):
  1. TTFT: the answer with ``max_new_tokens=1`` (embed, LM prefill, first token), eager and
     with ``compile=True``. Only the decode step is compiled and a one-token answer runs no
     decode step, so compiled TTFT equals eager TTFT up to noise (its caches are the
     fixed-shape ones the compiled step reads).
  2. the share of that prefill spent in the image encoder and projector
     (``model.encode("image", images)`` alone) and in the whole ``model.embed``.
  3. decode tokens/s, eager and compiled: (answer with N new tokens - answer with 1) over
     N - 1 steps, times B. The decode step compiles once per batch size before the
     alternation (dynamo caches reset first, as in a fresh process); compile time, graphs
     and graph breaks are printed, and any graph built while timed.
  4. the floor, as in ``bench_text``: no peer runs this exact model, so each decode figure is
     read against the bytes a step must read (every LM weight a step multiplies by, the
     experts its routers chose, the KV cache; ``bench_text.decode_floor`` counts them while
     decoding this prompt) over the rate a plain sum reads the LM's weights here
     (``common.stream_rate``), and the fraction of that floor reached is printed. The LM is
     about 19 MB, within the last-level cache of most servers (the banner prints its
     size), so the rate is the cache's.

Run: ``uv run --locked --all-packages python tests/benchmarks/bench_multimodal.py`` (2-4
minutes on 2 cores, most of it compiling the decode step once per batch size; less when
inductor's on-disk cache holds the graphs), ``--quick`` (fewer tokens and rounds),
``--new N`` (decode tokens per answer), ``--repeat R`` (alternating rounds).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from bench_text import decode_floor, warm_up
from common import CompileWatch, banner, fmt_bytes, require, stream_rate, time_alternating

from vats_apps.multimodal import MultimodalConfig, MultimodalLM, ProjectorConfig
from vats_apps.multimodal.inputs import MultimodalBatch, build_inputs
from vats_text.corpus import load_corpus
from vats_text.generation import generate
from vats_text.model import MoELanguageModel
from vats_text.presets import lm_preset
from vats_text.tokenizer import Tokenizer
from vats_vision.presets import vit2d_preset

QUESTION = "<image>\nWhat colour is the shape?\n"
IMAGE_SIZE = 24
MODES = ("eager", "compiled")


def build() -> tuple[MultimodalLM, Tokenizer]:
    """The demo-sized model with random weights, and its tokenizer."""
    tok = Tokenizer.train(load_corpus("train", max_files=40), vocab_size=4096)
    lm = lm_preset("small", vocab_size=tok.vocab_size)
    image = vit2d_preset(
        "small",
        image_size=IMAGE_SIZE,
        patch_size=4,
        dim=96,
        n_layers=4,
        n_heads=4,
        mlp_hidden_dim=256,
        qk_norm=True,
    )
    config = MultimodalConfig(
        lm=lm,
        image_encoder=image,
        image_projector=ProjectorConfig(in_dim=image.dim, out_dim=lm.dim),
    )
    torch.manual_seed(0)
    return MultimodalLM(config).eval(), tok


def question(model: MultimodalLM, tok: Tokenizer, batch: int, new: int) -> MultimodalBatch:
    """``batch`` copies of the question, each with its own random image in [-1, 1]."""
    g = torch.Generator().manual_seed(batch)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1 for _ in range(batch)]
    return build_inputs(model, tok, [QUESTION] * batch, images=images, max_new_tokens=new)


def answer(model: MultimodalLM, batch: MultimodalBatch, new: int, compile: bool) -> Tensor:
    """``MultimodalLM.generate`` with EOS off: exactly ``new`` tokens a row, greedy."""
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.attention_mask, images=batch.images)
        return generate(
            model.lm,
            batch.input_ids,
            attention_mask=batch.attention_mask,
            inputs_embeds=embeds,
            max_new_tokens=new,
            eos_token_id=[],
            compile=compile,
        )


class _PrefillFromEmbeds:
    """The LM as ``bench_text.decode_floor`` drives it, with the prefill reading the prompt's
    embeddings (image features scattered in) instead of its ids: the decode steps then see
    the caches, tokens and expert choices of the real answer. Everything else is the LM's."""

    def __init__(self, lm: MoELanguageModel, input_ids: Tensor, embeds: Tensor) -> None:
        self.lm, self.input_ids, self.embeds = lm, input_ids, embeds

    def __getattr__(self, name: str) -> object:
        return getattr(self.lm, name)

    def __call__(self, input_ids: Tensor, **kwargs: object) -> object:
        if input_ids is self.input_ids:  # the prefill
            return self.lm(None, inputs_embeds=self.embeds, **kwargs)
        return self.lm(input_ids, **kwargs)


def run_batch(
    model: MultimodalLM, tok: Tokenizer, *, b: int, new: int, repeat: int, rate: float
) -> dict[str, float]:
    """Time one batch size; returns its row of the summary table."""
    batch = question(model, tok, b, new)
    real = batch.attention_mask.all().item()
    require(real, "equal prompts must need no padding")  # the floor's prefill takes no mask
    t = batch.input_ids.shape[1]
    outs: dict[str, Tensor] = {}

    def call(name: str, fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            outs[name] = fn()

        return run

    def encode() -> Tensor:
        with torch.no_grad():
            return model.encode("image", batch.images)

    def embed() -> Tensor:
        with torch.no_grad():
            return model.embed(batch.input_ids, batch.attention_mask, images=batch.images)

    fns = {
        "ttft eager": call("ttft eager", lambda: answer(model, batch, 1, False)),
        "ttft compiled": call("ttft compiled", lambda: answer(model, batch, 1, True)),
        "decode eager": call("decode eager", lambda: answer(model, batch, new, False)),
        "decode compiled": call("decode compiled", lambda: answer(model, batch, new, True)),
        "encode": call("encode", encode),
        "embed": call("embed", embed),
    }
    print(
        f"\nbatch {b}: prompt {t} tokens ({model.media_token_counts(images=batch.images)['image'][0]}"
        f" of them the image), {new} new tokens, {repeat} alternating rounds after warm-up"
    )
    torch._dynamo.reset()  # this batch size compiles as in a fresh process
    notes = {name: warm_up(fn, compiled=name.endswith("compiled")) for name, fn in fns.items()}
    with torch.no_grad():
        plain = model.generate(
            batch.input_ids, batch.attention_mask, images=batch.images, max_new_tokens=1
        )
    require(torch.equal(plain, outs["ttft eager"]), "answer() differs from MultimodalLM.generate")
    for name in ("ttft compiled", "decode compiled"):
        same = torch.equal(outs[name], outs[name.replace("compiled", "eager")])
        require(same, f"{name} greedy tokens differ from eager's (batch {b})")
    eos = int((outs["decode eager"][:, t:] == model.config.lm.eos_token_id).sum())
    watch = CompileWatch()
    with watch():
        times = time_alternating(fns, repeat=repeat, warmup=0)
    require(
        torch.equal(outs["decode compiled"], outs["decode eager"]), "tokens changed while timed"
    )
    print(f"  compiled decode step: {notes['decode compiled'].strip() or 'no compile'}")
    print(
        f"  greedy tokens of compiled = eager: True; graphs built while timed: {watch.graphs}; "
        f"EOS among the eager answer's tokens: {eos} (generation does not stop on it)"
    )

    ttft = times["ttft eager"]
    print(
        f"  TTFT eager {ttft * 1e3:.1f} ms; image encoder + projector {times['encode'] * 1e3:.1f}"
        f" ms = {times['encode'] / ttft:.0%} of it; whole embed (+ token lookup and scatter) "
        f"{times['embed'] * 1e3:.1f} ms = {times['embed'] / ttft:.0%}; the LM prefill and first "
        f"token the rest, {(ttft - times['embed']) * 1e3:.1f} ms"
    )
    with torch.no_grad():
        embeds = model.embed(batch.input_ids, batch.attention_mask, images=batch.images)
    floor_s = decode_floor(
        _PrefillFromEmbeds(model.lm, batch.input_ids, embeds), batch.input_ids, new, rate
    )
    row: dict[str, float] = {"floor": b / floor_s}
    for mode in MODES:
        step = (times[f"decode {mode}"] - times[f"ttft {mode}"]) / (new - 1)
        row[f"ttft {mode}"] = times[f"ttft {mode}"]
        row[f"tps {mode}"] = b / step
    row["encode share"] = times["encode"] / ttft
    row["embed share"] = times["embed"] / ttft
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 2 rounds")
    parser.add_argument("--new", type=int, default=None, help="new tokens an answer (default 64)")
    parser.add_argument("--repeat", type=int, default=None, help="alternating rounds (default 7)")
    args = parser.parse_args()
    new = args.new or (16 if args.quick else 64)
    repeat = args.repeat or (2 if args.quick else 7)
    if new < 2:
        parser.error("--new must be at least 2 (decode = N tokens - 1 token)")

    banner("bench_multimodal: MultimodalLM image question (TTFT, decode, floor)")
    t0 = time.perf_counter()
    model, tok = build()
    parts = {
        "LM": model.lm,
        "image encoder": model.image_encoder,
        "projector": model.image_projector,
    }
    sizes = ", ".join(
        f"{name} {sum(p.numel() for p in part.parameters()) / 1e6:.2f} M"
        for name, part in parts.items()
    )
    lm_bytes = sum(p.numel() * p.element_size() for p in model.lm.parameters())
    print(
        f"model: random weights; {sizes} parameters (LM weights {fmt_bytes(lm_bytes)}); "
        f"tokenizer vocab {tok.vocab_size}; built in {time.perf_counter() - t0:.1f} s"
    )
    # Every LM weight matrix once, each expert on its own: what the decode steps read.
    matrices = [
        w for p in model.lm.parameters() for w in (p if p.dim() == 3 else [p]) if w.dim() == 2
    ]
    rate = stream_rate(matrices, repeat=10)  # best of 10: one quiet pass is enough
    rows = {b: run_batch(model, tok, b=b, new=new, repeat=repeat, rate=rate) for b in (1, 8)}

    print(
        f"\nsummary ({new} new tokens, medians of {repeat} rounds; floor at {rate / 1e9:.1f} GB/s)"
    )
    print(
        f"  {'batch':>5s}  {'mode':<8s}  {'TTFT ms':>8s}  {'decode tok/s':>12s}  "
        f"{'floor tok/s':>11s}  {'of floor':>8s}"
    )
    for b, row in rows.items():
        for mode in MODES:
            tps = row[f"tps {mode}"]
            print(
                f"  {b:5d}  {mode:<8s}  {row[f'ttft {mode}'] * 1e3:8.1f}  {tps:12.1f}  "
                f"{row['floor']:11.0f}  {tps / row['floor']:8.0%}"
            )
    for b, row in rows.items():
        print(
            f"  batch {b}: encoder + projector {row['encode share']:.0%} of the prefill (TTFT), "
            f"whole embed {row['embed share']:.0%}"
        )
    print(
        "  compiled TTFT = eager TTFT up to noise: only the decode step is compiled, the "
        "prefill and the encoders run eagerly"
    )
    if any(row[f"tps {mode}"] > row["floor"] for row in rows.values() for mode in MODES):
        print(
            "  above 100 %: that step read its weights faster than the plain sums did (a sum "
            "per matrix pays one kernel's overhead for each of these small matrices, a fused "
            "graph fewer; on a loaded machine the gap widens), so the floor bounds it loosely"
        )
    print(f"  total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
