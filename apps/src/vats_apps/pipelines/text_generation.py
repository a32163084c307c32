"""``vats pipeline=text_generation``: a tiny MoE language model, trained here, streaming text.

The first run trains a sentencepiece tokenizer and an MoE language model on the embedded
corpus (the standard library's docstrings, :mod:`vats_text.corpus`), with the vats-core
trainer and its progress bar, then saves both under ``pipeline.cache_dir`` keyed by a
hash of everything that shapes the weights (the resolved model config, data, training
settings, seed, and the versions and source of the code; see
:mod:`vats_apps.pipelines.cache`). Any later run with the same settings and code loads
them in seconds; a changed setting or changed code trains anew.

Then it reports the validation cross-entropy beside a unigram baseline's (the model must
beat word frequencies to have learned anything) and streams a continuation of each prompt.

``train.compile`` runs the training step through ``torch.compile``
(``TrainerConfig.compile``). ``pipeline.compile`` scores the validation set after training
on the model compiled with inductor's freezing (:func:`vats_core.inference.compile_frozen`)
and generates with ``compile=True`` (the decode step compiled); on CPU each costs tens of
seconds of compilation first.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vats_apps.pipelines.cache import REPORT_NAME, entry_key, reusable, staged_entry
from vats_apps.pipelines.compiling import check_compile_switches, compile_flags, trainer_fields
from vats_apps.pipelines.distributed import (
    Ranks,
    gathered_model,
    parallel_model,
    parallel_training,
)
from vats_core.inference import compile_frozen
from vats_core.parallel import ParallelConfig, global_router_losses
from vats_core.training import Trainer, TrainerConfig
from vats_text.corpus import load_corpus
from vats_text.data import (
    PackedBatches,
    count_tokens,
    evaluate_lm,
    lm_loss_fn,
    pack_texts,
    unigram_cross_entropy,
)
from vats_text.generation import stream
from vats_text.model import MoELanguageModel, MoELMConfig
from vats_text.presets import lm_preset
from vats_text.tokenizer import Tokenizer

CACHE_FORMAT = 1  # bump when what is cached changes meaning
# The packages whose code trains (and whose versions and source key) the cached model.
CODE = ("vats_core", "vats_text", "vats_apps")


@dataclass
class TrainedLM:
    tokenizer: Tokenizer
    model: MoELanguageModel
    report: dict[str, Any]  # validation and baseline cross-entropy, training time
    path: Path
    trained_now: bool


def model_config(cfg: DictConfig, vocab_size: int) -> MoELMConfig:
    """The model section (``preset`` + field overrides) as the dataclass config."""
    section = OmegaConf.to_container(cfg.model.text, resolve=True)
    assert isinstance(section, dict)
    preset = section.pop("preset", None)
    if preset is None:
        raise ValueError("model.text needs a `preset` (e.g. model/text=small)")
    return lm_preset(str(preset), vocab_size=vocab_size, **section)


def cache_key(cfg: DictConfig) -> str:
    """Hash of every setting that changes the trained weights, and of the code.

    The model enters as the resolved :class:`MoELMConfig` (preset plus overrides, every
    field), so a preset edited in vats_text changes the key though the YAML does not.
    ``train`` holds the data settings (corpus files, vocabulary, sequence length), the
    batch, the steps, ``compile`` and the trainer's fields.
    """
    spec = {
        "format": CACHE_FORMAT,
        "model": model_config(cfg, cfg.train.vocab_size).to_dict(),
        "train": OmegaConf.to_container(cfg.train, resolve=True),
        "seed": cfg.pipeline.seed,
    }
    return entry_key(spec, CODE)


def trainer_config(cfg: DictConfig, out_dir: str) -> TrainerConfig:
    """``train.trainer`` fields plus the pipeline's steps, seed and ``train.compile``."""
    fields = OmegaConf.to_container(cfg.train.trainer, resolve=True)
    assert isinstance(fields, dict)
    return TrainerConfig(
        **trainer_fields(fields, "train.trainer"),
        max_steps=cfg.train.max_steps,
        out_dir=out_dir,
        seed=cfg.pipeline.seed,
        compile=compile_flags(cfg).training,
    )


def load_or_train(cfg: DictConfig) -> TrainedLM:
    """The cached tokenizer and model for this config, training them if needed: what the
    pipelines that use the text model as a part call, on one process."""
    lm = load_or_train_ranks(cfg)
    if lm is None:
        raise ValueError(
            "the text model is trained under train.parallel by pipeline=text_generation "
            "alone: run it (under torchrun) first, then this pipeline on one process"
        )
    return lm


def load_or_train_ranks(cfg: DictConfig) -> TrainedLM | None:
    """:func:`load_or_train` on every rank of a ``train.parallel`` run: rank 0 gets the
    trained model, the other ranks None once they have trained (a cached model: every
    rank)."""
    loaded = cached(cfg)
    return loaded if loaded is not None else _train(cfg, _entry_path(cfg))


def _entry_path(cfg: DictConfig) -> Path:
    return Path(cfg.pipeline.cache_dir).expanduser() / "text_generation" / cache_key(cfg)


def cached(cfg: DictConfig) -> TrainedLM | None:
    """The tokenizer and model from their cache entry for ``cfg``, on the rank that calls
    it (None when there is none, or with ``pipeline.retrain``)."""
    path = _entry_path(cfg)
    if not reusable(path, cfg.pipeline.retrain):
        return None
    print(f"loading the cached model from {path}")
    tokenizer = Tokenizer.from_pretrained(path)
    model = MoELanguageModel.from_pretrained(path / "model")
    report = json.loads((path / REPORT_NAME).read_text())
    return TrainedLM(tokenizer, model.eval(), report, path, trained_now=False)


def _train(cfg: DictConfig, path: Path) -> TrainedLM | None:
    """Train under ``train.parallel`` (see :mod:`vats_apps.pipelines.distributed`): the
    trained model on rank 0, None on the other ranks."""
    train_cfg = cfg.train
    # A bad model, trainer, compile or parallel setting fails before any work.
    model_config(cfg, train_cfg.vocab_size)
    trainer_config(cfg, out_dir=str(path / "run"))
    check_compile_switches(cfg)
    with parallel_training(
        cfg,
        {"train.batch_size": train_cfg.batch_size},
        lambda: [MoELanguageModel(model_config(cfg, train_cfg.vocab_size))],
    ) as (parallel, ranks):
        return _train_ranks(cfg, path, parallel, ranks)


def _global_loss_fn(config: MoELMConfig) -> Callable[[nn.Module, Mapping[str, Tensor]], Any]:
    """``lm_loss_fn`` for a rank of a ``train.parallel`` run: the same cross-entropy (packed
    rows, no padding: each rank's mean is a mean over as many tokens), with the MoE router
    losses of the global batch (:func:`~vats_core.parallel.global_router_losses`) in place of
    the rank's own. The load-balancing loss is no mean over tokens, so the ranks' average of
    their own is not the global batch's, value or gradient."""

    def loss_fn(model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        out = model(
            batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"]
        )
        zero = out.ce_loss.detach().new_zeros(())
        if not out.router_stats:  # a dense model
            return out.ce_loss, {"ce": out.ce_loss.detach(), "aux": zero, "z": zero}
        balancing, z = global_router_losses(out.router_stats)
        loss = out.ce_loss + config.aux_loss_weight * balancing + config.z_loss_weight * z
        # The metrics stay the rank's own losses (rank 0's are logged), as on one process.
        metrics = {"aux": out.aux_loss.detach(), "z": out.z_loss.detach()}
        return loss, {"ce": out.ce_loss.detach(), **metrics}

    return loss_fn


def _train_ranks(
    cfg: DictConfig, path: Path, parallel: ParallelConfig, ranks: Ranks
) -> TrainedLM | None:
    train_cfg = cfg.train
    torch.manual_seed(cfg.pipeline.seed)
    print("no cached model for this config: training one (tokenizer, then the MoE LM)")
    train_docs = load_corpus("train", max_files=train_cfg.max_files)
    val_docs = load_corpus("validation", max_files=train_cfg.max_files)
    if not train_docs or not val_docs:
        raise ValueError(
            f"the corpus is empty with train.max_files={train_cfg.max_files}: allow more files"
        )
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train(train_docs, vocab_size=train_cfg.vocab_size)
    train_rows = pack_texts(tokenizer, train_docs, seq_len=train_cfg.seq_len)
    val_rows = pack_texts(tokenizer, val_docs, seq_len=train_cfg.seq_len)
    print(
        f"tokenizer: {tokenizer.vocab_size} pieces in {time.perf_counter() - t0:.1f} s; "
        f"corpus: {train_rows.numel():,} train / {val_rows.numel():,} validation tokens"
    )

    model = MoELanguageModel(model_config(cfg, tokenizer.vocab_size))
    print(
        f"model: {model.num_parameters() / 1e6:.2f} M parameters "
        f"({model.num_parameters(active=True) / 1e6:.2f} M active per token)"
    )
    # Built in a temporary sibling, then renamed: an interrupted run leaves no half cache.
    # Rank 0 alone writes it; the others' trainers write nothing to their scratch out_dir.
    staged = staged_entry(path) if ranks.is_main else tempfile.TemporaryDirectory()
    with staged as staging_dir:
        staging = Path(staging_dir)
        trainer = Trainer(
            parallel_model(model, parallel),
            trainer_config(cfg, out_dir=str(staging / "run")),
            data=PackedBatches(train_rows, train_cfg.batch_size, seed=cfg.pipeline.seed),
            loss_fn=lm_loss_fn if parallel == ParallelConfig() else _global_loss_fn(model.config),
            eval_fn=lambda m: evaluate_lm(m, val_rows, max_rows=train_cfg.eval_rows),
            items_fn=count_tokens,
            items_name="tokens",
        )
        t0 = time.perf_counter()
        trainer.fit()
        train_seconds = time.perf_counter() - t0
        gathered = gathered_model(trainer.model, model, parallel)  # every rank takes part
        if gathered is None:  # a rank other than 0: rank 0 scores and caches
            return None
        model = gathered.eval()  # type: ignore[assignment]
        # The weights are final here: score them on the frozen compiled model if asked.
        scorer = compile_frozen(model) if compile_flags(cfg).evaluation else model
        val = evaluate_lm(scorer, val_rows)  # type: ignore[arg-type]
        report = {
            "val_ce": val["loss"],
            "val_ppl": val["ppl"],
            "unigram_ce": unigram_cross_entropy(train_rows, val_rows, tokenizer.vocab_size),
            "train_seconds": train_seconds,
            "train_steps": train_cfg.max_steps,
        }
        report["unigram_ppl"] = float(torch.tensor(report["unigram_ce"]).exp())
        shutil.rmtree(staging / "run")
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging / "model")
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return TrainedLM(tokenizer, model, report, path, trained_now=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train or load the model, print perplexities, stream a continuation of each prompt."""
    gen = cfg.generation
    prompts = [cfg.prompt] if cfg.prompt is not None else list(cfg.prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be strings, got {prompts!r}")
    if gen.max_new_tokens < 0:
        raise ValueError(f"generation.max_new_tokens={gen.max_new_tokens} must be >= 0")
    flags = check_compile_switches(cfg)
    lm = load_or_train_ranks(cfg)
    if lm is None:  # a rank other than 0 of a parallel training: rank 0 reports
        return {}
    r = lm.report
    print(
        f"validation cross-entropy {r['val_ce']:.3f} nats (perplexity {r['val_ppl']:.1f}) vs "
        f"unigram baseline {r['unigram_ce']:.3f} nats (perplexity {r['unigram_ppl']:.1f})"
    )
    generator = torch.Generator().manual_seed(cfg.pipeline.seed)
    samples = []
    for prompt in prompts:
        print(f"\n>>> {prompt}", end="", flush=True)
        pieces = []
        for piece in stream(
            lm.model,
            lm.tokenizer,
            prompt,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            generator=generator,
            compile=flags.evaluation,
        ):
            print(piece, end="", flush=True)
            pieces.append(piece)
        samples.append(prompt + "".join(pieces))
    print()
    return {**r, "samples": samples, "cache": str(lm.path), "trained_now": lm.trained_now}
