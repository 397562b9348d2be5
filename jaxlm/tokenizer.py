"""Tokenizers: train a byte-level BPE or load any HF ``tokenizer.json``.

``Tokenizer`` wraps a Rust ``tokenizers.Tokenizer`` with the two ids jaxlm needs:
``eos_id`` (end of document, written between packed documents) and ``pad_id``.

- ``train_bpe(texts, vocab_size)`` trains a GPT-2 style byte-level BPE (no normaliser,
  so decoding reproduces any UTF-8 text exactly) with the special tokens
  ``<|endoftext|>`` (id 0, end of document) and ``<|padding|>`` (id 1).
- ``Tokenizer.load(path)`` reads a ``tokenizer.json`` (or a directory holding one, e.g.
  an HF checkpoint such as OLMo's GPT-NeoX tokenizer). The end-of-document and padding
  tokens come from, in order: the explicit ``eos_token`` / ``pad_token`` arguments, a
  ``tokenizer_config.json`` or ``special_tokens_map.json`` beside the file, then the
  file's added tokens with a well-known name (``<|endoftext|>``, ``</s>``, ``<|padding|>``,
  ``<pad>``, ...). Without a padding token the end-of-document token pads.

Encoding treats text literally: a document that contains the string ``<|endoftext|>``
is encoded as ordinary text, never as the special id (``parse_special_tokens=True``
changes that), and no post-processor tokens (BOS/EOS templates) are added; jaxlm adds
its own end-of-document ids when packing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from jaxlm.errors import JaxlmError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
TOKENIZER_FILE = "tokenizer.json"

# Names of end-of-document / padding tokens in common tokenizers, in order of preference.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
KNOWN_PAD_TOKENS = (PAD_TOKEN, "<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_SIDE_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(JaxlmError, ValueError):
    """A tokenizer file or special-token choice is invalid; the message names the file."""


class Tokenizer:
    """A HF ``tokenizers`` tokenizer plus the end-of-document and padding ids."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_id: int,
        pad_id: int,
        parse_special_tokens: bool = False,
    ) -> None:
        size = backend.get_vocab_size(with_added_tokens=True)
        for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
            if not isinstance(value, int) or not 0 <= value < size:
                raise TokenizerError(f"{name}={value!r} is not a token id of this tokenizer (0..{size - 1})")
        backend.encode_special_tokens = not parse_special_tokens
        self._backend = backend
        self._eos_id = eos_id
        self._pad_id = pad_id

    # -- construction -------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        eos_token: str | int | None = None,
        pad_token: str | int | None = None,
        parse_special_tokens: bool = False,
    ) -> "Tokenizer":
        """Load ``path`` (a ``tokenizer.json`` or a directory holding one); see the module doc."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no tokenizer file (expected an HF {TOKENIZER_FILE})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust loader raises a bare Exception with its parse error
            raise TokenizerError(f"{file}: not a valid HF {TOKENIZER_FILE}: {err}") from err
        side = _side_config_tokens(file.parent)
        eos = _resolve_special(backend, file, "end-of-document", eos_token, side.get("eos_token"), KNOWN_EOS_TOKENS)
        if eos is None:
            raise TokenizerError(
                f"{file}: cannot tell which token ends a document; pass eos_token= "
                f"(special tokens in the file: {_special_token_names(backend) or 'none'})"
            )
        pad = _resolve_special(backend, file, "padding", pad_token, side.get("pad_token"), KNOWN_PAD_TOKENS)
        return cls(backend, eos_id=eos, pad_id=eos if pad is None else pad, parse_special_tokens=parse_special_tokens)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file path, or a directory to put it in)."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, file)
        return file

    # -- properties ---------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's vocabulary must be at least this)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def to_json(self) -> str:
        """The tokenizer in HF ``tokenizer.json`` form."""
        return self._backend.to_str()

    def fingerprint(self) -> str:
        """sha256 (hex) of the serialized tokenizer and its eos/pad ids: same tokens, same hash."""
        digest = hashlib.sha256(self.to_json().encode("utf-8"))
        digest.update(f"\0eos_id={self._eos_id}\0pad_id={self._pad_id}".encode())
        return digest.hexdigest()

    # -- encoding -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); same ids as ``encode`` one by one."""
        encodings = self._backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        rows = [[int(i) for i in ids] for ids in batch]
        return self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``: ids 0/1 are ``<|endoftext|>``/``<|padding|>``.

    The result has at most ``vocab_size`` ids (fewer when the texts support fewer merges);
    the 256 byte symbols are always present, so any text encodes and decodes exactly.
    """
    floor = 256 + 2
    if not isinstance(vocab_size, int) or vocab_size < floor:
        raise TokenizerError(f"vocab_size: expected an integer >= {floor} (256 bytes + 2 special tokens), got {vocab_size!r}")
    if min_frequency < 1:
        raise TokenizerError(f"min_frequency: expected >= 1, got {min_frequency!r}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in (EOS_TOKEN, PAD_TOKEN)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(iter(texts), trainer=trainer)
    return Tokenizer(backend, eos_id=backend.token_to_id(EOS_TOKEN), pad_id=backend.token_to_id(PAD_TOKEN))


# ---------------------------------------------------------------------------------------
# Special-token resolution for loaded files
# ---------------------------------------------------------------------------------------


def _special_token_names(backend: tokenizers.Tokenizer) -> list[str]:
    return [token.content for _, token in sorted(backend.get_added_tokens_decoder().items())]


def _side_config_tokens(directory: Path) -> dict[str, str]:
    """``eos_token`` / ``pad_token`` named by HF side files next to ``tokenizer.json``."""
    found: dict[str, str] = {}
    for name in _SIDE_CONFIG_FILES:
        side = directory / name
        if not side.is_file():
            continue
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TokenizerError(f"{side}: unreadable tokenizer side config: {err}") from err
        for key in ("eos_token", "pad_token"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
                value = value.get("content")
            if isinstance(value, str) and key not in found:
                found[key] = value
    return found


def _resolve_special(
    backend: tokenizers.Tokenizer,
    file: Path,
    role: str,
    explicit: str | int | None,
    from_side_config: str | None,
    known: Sequence[str],
) -> int | None:
    size = backend.get_vocab_size(with_added_tokens=True)
    if explicit is not None:
        if isinstance(explicit, int) and not isinstance(explicit, bool):
            if not 0 <= explicit < size:
                raise TokenizerError(f"{file}: {role} id {explicit} is outside the vocabulary (0..{size - 1})")
            return explicit
        token_id = backend.token_to_id(str(explicit))
        if token_id is None:
            raise TokenizerError(
                f"{file}: {role} token {explicit!r} is not in the vocabulary "
                f"(special tokens: {_special_token_names(backend) or 'none'})"
            )
        return token_id
    if from_side_config is not None and backend.token_to_id(from_side_config) is not None:
        return backend.token_to_id(from_side_config)
    specials = set(_special_token_names(backend))
    for name in known:
        if name in specials:
            return backend.token_to_id(name)
    return None
