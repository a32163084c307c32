"""A lossless sentencepiece BPE tokenizer with fixed special-token ids.

Wraps a sentencepiece (Kudo & Richardson, 2018, "SentencePiece: A simple and language
independent subword tokenizer and detokenizer for Neural Text Processing") model
trained with byte-pair encoding (Sennrich et al., 2016) and byte fallback, set up so
that ``decode(encode(s)) == s`` for every Python string ``s`` that is valid Unicode
(no lone surrogates): newlines, tabs, runs of spaces, control characters, emoji,
CJK and all. What makes that hold:

- ``byte_fallback``: a character that is not in the vocabulary is written as its
  UTF-8 bytes (256 reserved ``<0xNN>`` pieces), so nothing is ever ``<unk>``.
- ``normalization_rule_name="identity"``, ``add_dummy_prefix=False`` and
  ``remove_extra_whitespaces=False``: the text is not NFKC-normalised, no space is
  prepended and no whitespace is collapsed or stripped.
- sentencepiece writes spaces as the meta symbol ``▁`` (U+2581) and decodes every
  ``▁`` back to a space, so a literal ``▁`` in the input would come back as a space.
  :meth:`Tokenizer.encode` therefore writes a literal ``▁`` as its three byte pieces,
  which decode to ``▁`` itself.

Special tokens and their ids are the same in every model this class trains:

==========  ====  ==================================================================
piece       id    kind
==========  ====  ==================================================================
``<pad>``   0     control: never produced by ``encode``; ``decode`` always drops it
``<unk>``   1     unknown: never produced by ``encode`` (byte fallback); decodes to ⁇
``<s>``     2     control (BOS): only via ``add_bos=True``, never from text
``</s>``    3     control (EOS): only via ``add_eos=True``, never from text
``<image>`` 4     user-defined: the text ``"<image>"`` encodes to this one id
``<video>`` 5     user-defined: the text ``"<video>"`` encodes to this one id
``<audio>`` 6     user-defined: the text ``"<audio>"`` encodes to this one id
==========  ====  ==================================================================

BOS/EOS/PAD are control symbols so that user text can never inject them: the
string ``"</s>"`` encodes as ordinary characters. The media placeholders are
user-defined symbols because prompt templates write them as text
(``"<image>\\nDescribe the picture."``); they decode back to their text, which keeps
the round trip exact.

Example:
    >>> from vats_text.corpus import load_corpus
    >>> tok = Tokenizer.train(load_corpus("train"), vocab_size=4096)
    >>> ids = tok.encode("Return the sum.", add_bos=True)
    >>> input_ids, attention_mask = tok.encode_batch(["a", "bc"], padding_side="left")
    >>> tok.save_pretrained("out/tokenizer")
    >>> tok = Tokenizer.from_pretrained("out/tokenizer")

Shapes: B batch, T sequence length.
"""

from __future__ import annotations

import errno
import io
import operator
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import sentencepiece as spm
import torch
from torch import Tensor

from vats_core.config import is_int

__all__ = [
    "AUDIO_ID",
    "AUDIO_TOKEN",
    "BOS_ID",
    "EOS_ID",
    "IMAGE_ID",
    "IMAGE_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_ID",
    "UNK_ID",
    "VIDEO_ID",
    "VIDEO_TOKEN",
    "Tokenizer",
]

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
IMAGE_ID, VIDEO_ID, AUDIO_ID = 4, 5, 6
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = "<image>", "<video>", "<audio>"
_PAD, _UNK, _BOS, _EOS = "<pad>", "<unk>", "<s>", "</s>"
# Piece expected at each fixed id; a model that disagrees is not a vats tokenizer.
_FIXED_PIECES = (_PAD, _UNK, _BOS, _EOS, IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN)
_N_BYTES = 256
# Smallest useful vocabulary: the fixed pieces, the 256 byte pieces, and room for at
# least one learned piece.
MIN_VOCAB_SIZE = len(_FIXED_PIECES) + _N_BYTES + 1
_META = "\u2581"  # sentencepiece's whitespace symbol "▁"
# A string whose round trip fails unless the model was trained with the settings in
# the module docstring (identity normalisation, no dummy prefix, whitespace kept).
_PROBE = "  A\uff21 \t\n x  " + _META + IMAGE_TOKEN + "\u00e9\U0001f600"
PADDING_SIDES = ("left", "right")


class Tokenizer:
    """A sentencepiece BPE tokenizer whose decode inverts encode exactly.

    Build one with :meth:`train`, :meth:`load` or :meth:`from_pretrained`; the
    constructor takes the serialized model.

    Args:
        model_proto: The bytes of a sentencepiece ``.model`` file trained by
            :meth:`train` (or with the same special pieces and settings).

    Raises:
        ValueError: If the bytes are not a sentencepiece model, the special pieces
            are not at their fixed ids, or the model does not round-trip text.
    """

    #: File name used by :meth:`save_pretrained` and :meth:`from_pretrained`.
    MODEL_FILENAME = "tokenizer.model"

    def __init__(self, model_proto: bytes) -> None:
        if not isinstance(model_proto, bytes | bytearray):
            raise ValueError(
                f"model_proto must be bytes (a serialized sentencepiece model), "
                f"got {type(model_proto).__name__}"
            )
        self._proto = bytes(model_proto)
        self._sp = _load_processor(self._proto)
        self._check_layout()
        # A literal "▁" is encoded as its UTF-8 byte pieces (see module docstring).
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        if self.decode(self.encode(_PROBE)) != _PROBE:
            raise ValueError(
                "the model does not decode text back exactly (it must be trained with "
                "normalization_rule_name='identity', add_dummy_prefix=False, "
                "remove_extra_whitespaces=False); train it with Tokenizer.train"
            )

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | None = None,
        *,
        files: Sequence[str | os.PathLike[str]] | None = None,
        vocab_size: int,
        out: str | os.PathLike[str] | None = None,
        character_coverage: float = 0.9995,
        split_digits: bool = True,
        max_sentence_length: int = 1 << 20,
        input_sentence_size: int = 0,
        seed: int = 0,
        num_threads: int = 1,
        verbose: bool = False,
    ) -> Tokenizer:
        """Trains a BPE tokenizer on strings or text files.

        Training is deterministic: the same inputs and arguments give the same model
        byte for byte. About 0.3 s for a 4k vocabulary on 2 MB of text.

        Args:
            texts: Documents to train on, one string each (newlines inside a
                document are kept and can become part of pieces). A list, generator
                or any iterable; it is read once.
            files: Instead of ``texts``: UTF-8 text files, read one line per
                sentence (sentencepiece's file format, so newlines are not learned).
            vocab_size: Size of the vocabulary, special and byte pieces included;
                at least :data:`MIN_VOCAB_SIZE`. sentencepiece raises (as
                ``ValueError`` here) when the text is too small to learn that many
                pieces.
            out: If given, the trained model is also saved to this path, as by
                :meth:`save`.
            character_coverage: Share of the training characters that get their
                own piece; the rarest rest is written as bytes.
            split_digits: Split runs of digits into single digits, so numbers are
                spelled the same way everywhere.
            max_sentence_length: Longest document, in bytes, kept for training
                (longer ones are skipped by sentencepiece).
            input_sentence_size: If > 0, train on a random sample of that many
                documents, drawn with ``seed``; 0 uses all of them.
            seed: Seed of sentencepiece's random generator (sampling and
                shuffling). sentencepiece keeps one generator per process.
            num_threads: Training threads.
            verbose: Let sentencepiece log its progress to stderr.

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: If neither or both of ``texts`` and ``files`` are given,
                ``texts`` is a single string or holds a non-string, an argument is
                out of range, or sentencepiece cannot train on the input.
            FileNotFoundError: If one of ``files`` does not exist.
        """
        sentences, input_files = _check_training_input(texts, files)
        if not is_int(vocab_size):
            raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be >= {MIN_VOCAB_SIZE} (7 special + 256 byte pieces + 1), "
                f"got {vocab_size}"
            )
        if not 0.0 < character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0, 1], got {character_coverage}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        if input_sentence_size < 0:
            raise ValueError(f"input_sentence_size must be >= 0, got {input_sentence_size}")

        spm.set_random_generator_seed(seed)
        writer = io.BytesIO()
        options: dict[str, Any] = {
            "model_type": "bpe",
            "vocab_size": vocab_size,
            "byte_fallback": True,
            "character_coverage": character_coverage,
            "normalization_rule_name": "identity",
            "add_dummy_prefix": False,
            "remove_extra_whitespaces": False,
            "split_digits": split_digits,
            "allow_whitespace_only_pieces": True,
            "max_sentence_length": max_sentence_length,
            "input_sentence_size": input_sentence_size,
            "shuffle_input_sentence": True,
            "num_threads": num_threads,
            "pad_id": PAD_ID,
            "unk_id": UNK_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "pad_piece": _PAD,
            "unk_piece": _UNK,
            "bos_piece": _BOS,
            "eos_piece": _EOS,
            # What decode writes for <unk> (never produced by encode); the default
            # pads it with spaces.
            "unk_surface": "\u2047",
            # Assigned the ids right after the four above, in this order.
            "user_defined_symbols": [IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN],
            "minloglevel": 0 if verbose else 2,
            "model_writer": writer,
        }
        if input_files is not None:
            options["input"] = input_files
        else:
            options["sentence_iterator"] = iter(sentences)
        try:
            spm.SentencePieceTrainer.train(**options)
        except (RuntimeError, ValueError) as e:
            if sentences is not None and sentences.error is not None:
                raise sentences.error from None
            raise ValueError(f"sentencepiece could not train the tokenizer: {e}") from e
        tokenizer = cls(writer.getvalue())
        if out is not None:
            tokenizer.save(out)
        return tokenizer

    # ---------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and byte pieces included."""
        return self._sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0): fills padded positions; ``decode`` drops it."""
        return PAD_ID

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (1); never produced by ``encode`` thanks to byte fallback."""
        return UNK_ID

    @property
    def bos_id(self) -> int:
        """Id of ``<s>`` (2), the beginning-of-sequence token."""
        return BOS_ID

    @property
    def eos_id(self) -> int:
        """Id of ``</s>`` (3), the end-of-sequence token."""
        return EOS_ID

    @property
    def image_id(self) -> int:
        """Id of the ``<image>`` placeholder (4)."""
        return IMAGE_ID

    @property
    def video_id(self) -> int:
        """Id of the ``<video>`` placeholder (5)."""
        return VIDEO_ID

    @property
    def audio_id(self) -> int:
        """Id of the ``<audio>`` placeholder (6)."""
        return AUDIO_ID

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The fixed ids 0-6: pad, unk, bos, eos, image, video, audio."""
        return tuple(range(len(_FIXED_PIECES)))

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model (the bytes of the ``.model`` file)."""
        return self._proto

    def id_to_piece(self, token_id: int) -> str:
        """Returns the piece of one id (``"▁the"``, ``"<0x0A>"``, ``"<s>"`` ...).

        Raises:
            ValueError: If the id is out of range.
        """
        (token_id,) = self._check_ids([token_id])
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """Returns the id of a piece, or :attr:`unk_id` if the piece is unknown."""
        return self._sp.piece_to_id(piece)

    # ----------------------------------------------------------------- encoding

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Encodes one string.

        Args:
            text: Any string without lone surrogates.
            add_bos: Prepend :attr:`bos_id`.
            add_eos: Append :attr:`eos_id`.

        Returns:
            The token ids; ``decode`` gives ``text`` back exactly.

        Raises:
            ValueError: If ``text`` is not a ``str`` or is not valid Unicode.
        """
        _check_text(text, "text")
        ids = self._encode_text(text)
        return self._add_specials(ids, add_bos, add_eos)

    @overload
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        padding_side: str = ...,
        add_bos: bool = ...,
        add_eos: bool = ...,
        max_length: int | None = ...,
        truncation: bool = ...,
        return_tensors: Literal[True] = ...,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        padding_side: str = ...,
        add_bos: bool = ...,
        add_eos: bool = ...,
        max_length: int | None = ...,
        truncation: bool = ...,
        return_tensors: Literal[False],
    ) -> tuple[list[list[int]], list[list[bool]]]: ...

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        padding_side: str = "right",
        add_bos: bool = False,
        add_eos: bool = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: bool = True,
    ) -> tuple[Tensor, Tensor] | tuple[list[list[int]], list[list[bool]]]:
        """Encodes several strings and pads them to the longest row.

        Args:
            texts: The strings, one per row (B >= 1).
            padding_side: ``"right"`` (pad after the tokens: training, encoders) or
                ``"left"`` (pad before them: batched generation prompts).
            add_bos: Prepend :attr:`bos_id` to every row.
            add_eos: Append :attr:`eos_id` to every row.
            max_length: Longest row allowed, special tokens included. Rows are
                padded to the longest row, not to ``max_length``.
            truncation: With ``max_length``, cut longer rows by keeping their first
                tokens (BOS/EOS are kept). Without it, a longer row is an error.
            return_tensors: Return tensors; otherwise padded Python lists.

        Returns:
            ``(input_ids, attention_mask)``: ``input_ids`` is a LongTensor (B, T)
            filled with :attr:`pad_id` at padded positions; ``attention_mask`` is a
            BoolTensor (B, T), ``True`` at real tokens (the ``key_padding_mask``
            convention of ``vats_core.attention``; ``.long()`` gives the 1/0 mask
            of HF models). T is the longest row, possibly 0. With
            ``return_tensors=False``: the same as lists of lists of ``int`` and
            ``bool``.

        Raises:
            ValueError: If ``texts`` is empty or not a sequence of strings,
                ``padding_side`` is not ``"left"`` or ``"right"``, ``max_length``
                is below the number of special tokens, or a row is longer than
                ``max_length`` without ``truncation``.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(
                f"texts must be a list or tuple of strings, got {type(texts).__name__}; "
                f"use encode() for one string"
            )
        if len(texts) == 0:
            raise ValueError("texts is empty: encode_batch needs at least one string")
        for i, text in enumerate(texts):
            _check_text(text, f"texts[{i}]")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        n_special = int(add_bos) + int(add_eos)
        if max_length is not None and (not is_int(max_length) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int or None, got {max_length!r}")
        if max_length is not None and max_length < n_special:
            raise ValueError(
                f"max_length={max_length} leaves no room for the {n_special} special tokens "
                f"(add_bos={add_bos}, add_eos={add_eos})"
            )

        rows = []
        for i, ids in enumerate(self._encode_many(texts)):
            if max_length is not None and len(ids) + n_special > max_length:
                if not truncation:
                    raise ValueError(
                        f"texts[{i}] is {len(ids) + n_special} tokens long, more than "
                        f"max_length={max_length}; pass truncation=True to cut it"
                    )
                ids = ids[: max_length - n_special]
            rows.append(self._add_specials(ids, add_bos, add_eos))

        width = max(len(r) for r in rows)
        id_rows, mask_rows = [], []
        for r in rows:
            pad = width - len(r)
            if padding_side == "right":
                id_rows.append(r + [PAD_ID] * pad)
                mask_rows.append([True] * len(r) + [False] * pad)
            else:
                id_rows.append([PAD_ID] * pad + r)
                mask_rows.append([False] * pad + [True] * len(r))
        if not return_tensors:
            return id_rows, mask_rows
        input_ids = torch.tensor(id_rows, dtype=torch.long).reshape(len(rows), width)  # (B, T)
        attention_mask = torch.tensor(mask_rows, dtype=torch.bool).reshape(len(rows), width)
        return input_ids, attention_mask

    # ----------------------------------------------------------------- decoding

    def decode(self, ids: Sequence[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Decodes one sequence of ids.

        ``<pad>`` is always dropped. ``<image>``/``<video>``/``<audio>`` decode to
        their text. Byte pieces that do not form valid UTF-8 (a sequence cut in the
        middle of a character) decode to U+FFFD.

        Args:
            ids: Token ids: a sequence of ints or a 1-D integer tensor.
            skip_special_tokens: Drop ``<s>`` and ``</s>``; if ``False`` they are
                written as the text ``"<s>"`` and ``"</s>"``.

        Returns:
            The text.

        Raises:
            ValueError: If ``ids`` is not one sequence of ints or holds an id
                outside ``[0, vocab_size)``.
        """
        ids = self._check_ids(_as_id_list(ids, "ids"))
        if skip_special_tokens:
            # Control pieces (pad, bos, eos) decode to "" in sentencepiece.
            return self._sp.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in (BOS_ID, EOS_ID):
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def decode_batch(
        self, batch: Sequence[Sequence[int]] | Tensor, *, skip_special_tokens: bool = True
    ) -> list[str]:
        """Decodes several sequences, e.g. the ``input_ids`` of :meth:`encode_batch`.

        Args:
            batch: A LongTensor (B, T) or a sequence of id sequences; padding is
                dropped wherever it is.
            skip_special_tokens: As in :meth:`decode`.

        Returns:
            One string per row.

        Raises:
            ValueError: If ``batch`` is not 2-D or holds an id out of range.
        """
        if isinstance(batch, Tensor):
            if batch.dim() != 2:
                raise ValueError(
                    f"batch must be a 2-D tensor (B, T), got shape {tuple(batch.shape)}"
                )
            rows: Sequence[Any] = batch.tolist()
        elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
            rows = batch
        else:
            raise ValueError(
                f"batch must be a 2-D tensor or a sequence of id sequences, "
                f"got {type(batch).__name__}"
            )
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    # ------------------------------------------------------------------ storage

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the ``.model`` file atomically (temporary file, then rename).

        Args:
            path: File to write; its parent directories are created.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._proto)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Reads a ``.model`` file written by :meth:`save`.

        Args:
            path: The file.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: If the file does not exist (or is a directory).
            ValueError: If the file is not a valid vats tokenizer model.
        """
        path = Path(path)
        if path.is_dir():
            raise FileNotFoundError(
                errno.ENOENT,
                f"tokenizer model path is a directory; use Tokenizer.from_pretrained() for "
                f"a directory holding {cls.MODEL_FILENAME}",
                str(path),
            )
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "tokenizer model file not found", str(path))
        data = path.read_bytes()
        try:
            return cls(data)
        except ValueError as e:
            raise ValueError(f"{path} is not a valid vats tokenizer model: {e}") from e

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Writes ``tokenizer.model`` into a directory (created if missing).

        Args:
            save_directory: The directory, e.g. the one a model was saved to.

        Returns:
            The path of the written file.
        """
        return self.save(Path(save_directory) / self.MODEL_FILENAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Reads ``tokenizer.model`` from a directory written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: If the directory or the file in it does not exist.
            ValueError: If the file is not a valid vats tokenizer model.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(errno.ENOENT, "tokenizer directory not found", str(directory))
        return cls.load(directory / cls.MODEL_FILENAME)

    # ------------------------------------------------------------ python protocol

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self._proto == other._proto

    def __hash__(self) -> int:
        return hash(self._proto)

    def __getstate__(self) -> dict[str, bytes]:
        # The sentencepiece processor is rebuilt from the bytes (DataLoader workers).
        return {"model_proto": self._proto}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self.__init__(state["model_proto"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------- internals

    def _check_layout(self) -> None:
        """Checks that the special pieces sit at their fixed ids and byte fallback exists."""
        sp = self._sp
        if sp.get_piece_size() < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocabulary of {sp.get_piece_size()} pieces is smaller than {MIN_VOCAB_SIZE}"
            )
        for token_id, piece in enumerate(_FIXED_PIECES):
            if sp.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"id {token_id} must be the piece {piece!r}, found "
                    f"{sp.id_to_piece(token_id)!r}; train the model with Tokenizer.train"
                )
        if not all(sp.is_control(i) for i in (PAD_ID, BOS_ID, EOS_ID)) or not sp.is_unknown(UNK_ID):
            raise ValueError("<pad>, <s>, </s> must be control pieces and <unk> the unknown piece")
        if not all(sp.is_byte(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(_N_BYTES)):
            raise ValueError("the model has no byte fallback pieces <0x00>..<0xFF>")

    def _encode_text(self, text: str) -> list[int]:
        try:
            if _META not in text:
                return self._sp.encode(text)
            ids: list[int] = []
            for i, part in enumerate(text.split(_META)):
                if i:
                    ids.extend(self._meta_ids)
                if part:
                    ids.extend(self._sp.encode(part))
            return ids
        except (RuntimeError, TypeError, UnicodeEncodeError) as e:
            _raise_if_not_utf8([text], e)
            raise

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        plain = [i for i, t in enumerate(texts) if _META not in t]
        out: list[list[int]] = [[] for _ in texts]
        try:
            # sentencepiece encodes a list in one call (in C++, multithreaded).
            for i, ids in zip(plain, self._sp.encode([texts[i] for i in plain]), strict=True):
                out[i] = ids
        except (RuntimeError, TypeError, UnicodeEncodeError) as e:
            _raise_if_not_utf8(texts, e)
            raise
        for i, t in enumerate(texts):
            if _META in t:
                out[i] = self._encode_text(t)
        return out

    @staticmethod
    def _add_specials(ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [BOS_ID, *ids]
        if add_eos:
            ids = [*ids, EOS_ID]
        return ids

    def _check_ids(self, ids: list[int]) -> list[int]:
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")
        return ids


def _load_processor(model_proto: bytes) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"not a sentencepiece model: {e}") from e
    return sp


def _check_text(text: object, name: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}")


def _as_id_list(ids: object, name: str) -> list[int]:
    """Turns a 1-D tensor/array or a sequence of ints into a list of Python ints."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D, got shape {tuple(ids.shape)}; use decode_batch for (B, T)"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
        return ids.tolist()
    if hasattr(ids, "tolist"):  # numpy arrays
        ids = ids.tolist()
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | Iterable):
        raise ValueError(f"{name} must be a sequence of ints, got {type(ids).__name__}")
    out = []
    for token_id in ids:
        try:
            if isinstance(token_id, bool):
                raise TypeError
            out.append(operator.index(token_id))  # int, numpy integer, 0-d int tensor
        except TypeError:
            raise ValueError(
                f"{name} must hold ints, got {type(token_id).__name__} {token_id!r}"
                + ("; use decode_batch for a batch" if isinstance(token_id, Sequence) else "")
            ) from None
    return out


def _check_training_input(
    texts: Iterable[str] | None, files: Sequence[str | os.PathLike[str]] | None
) -> tuple[_CheckedStrings | None, list[str] | None]:
    """Validates the two ways to give training text; returns (sentences, files)."""
    if (texts is None) == (files is None):
        raise ValueError("pass exactly one of texts (an iterable of strings) or files")
    if files is not None:
        if isinstance(files, str | os.PathLike):
            files = [files]
        if len(files) == 0:
            raise ValueError("files is empty")
        paths = []
        for f in files:
            path = Path(f)
            if not path.is_file():
                raise FileNotFoundError(errno.ENOENT, "training text file not found", str(path))
            paths.append(str(path))
        return None, paths
    if isinstance(texts, str | bytes):
        raise ValueError(
            "texts must be an iterable of strings, not a single string; "
            "wrap it in a list, or pass files=[path] to train on a file"
        )
    return _CheckedStrings(texts), None


class _CheckedStrings:
    """Iterates over training texts, checking each is a ``str``.

    sentencepiece turns an exception raised inside its iterator into a RuntimeError
    with a C++ prefix; keeping the original lets :meth:`Tokenizer.train` re-raise it.
    """

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.error: ValueError | None = None

    def __iter__(self) -> Iterator[str]:
        for i, text in enumerate(self._texts):
            if not isinstance(text, str):
                self.error = ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
                raise self.error
            yield text


def _raise_if_not_utf8(texts: Sequence[str], cause: BaseException) -> None:
    """Raises a clear ValueError if one of ``texts`` cannot be written as UTF-8."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text {i} is not valid Unicode ({e.reason} at index {e.start}: "
                f"{text[e.start : e.end]!r}); it cannot be tokenized"
            ) from cause
