"""Tokenizer: byte-level BPE training, exact round trips, save/load, HF tokenizer.json loading."""

import json

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from jaxlm.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, TokenizerError, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "A journey of a thousand miles begins with a single step.\n\n",
    "Byte pairs merge into tokens; tokens merge into words.\t(tabs too)\n",
    "Zürich, Köln, São Paulo and Kraków are cities.\n",
    "日本語のテキストも扱えます。中文也可以。\n",
    "emoji: 🙂🚀👩‍👩‍👧 done\r\n",
] * 20

TRICKY = [
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\r\n",
    "emoji 🙂 with ZWJ 👩‍👩‍👧 and flags 🇯🇵",
    "CJK 漢字かなカナ 한국어 and unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "control \x00\x01\x7f and combining e\u0301 vs \u00e9 (no normalisation)",
    "literal special strings <|endoftext|> and <|padding|> stay text",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400)


def test_special_token_ids_and_vocab(tok):
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.id_to_token(0) == EOS_TOKEN and tok.id_to_token(1) == PAD_TOKEN
    assert 258 < tok.vocab_size <= 400  # bytes + specials + some merges
    merged = tok.encode("The quick brown fox")
    assert len(merged) < len("The quick brown fox".encode())  # merges were learned


@pytest.mark.parametrize("text", TRICKY + CORPUS[:6])
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_strings_in_text_are_not_special_ids(tok):
    ids = tok.encode("a <|endoftext|> b")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    parsing = Tokenizer(tokenizers.Tokenizer.from_str(tok.to_json()), eos_id=0, pad_id=1, parse_special_tokens=True)
    assert tok.eos_id in parsing.encode("a <|endoftext|> b")


def test_decode_skips_or_keeps_special_tokens(tok):
    ids = tok.encode("one") + [tok.eos_id] + tok.encode("two") + [tok.pad_id]
    assert tok.decode(ids) == "onetwo"
    assert tok.decode(ids, skip_special_tokens=False) == "one<|endoftext|>two<|padding|>"


def test_batch_equals_single(tok):
    texts = TRICKY + CORPUS[:6]
    batch = tok.encode_batch(texts)
    assert batch == [tok.encode(t) for t in texts]
    assert tok.decode_batch(batch) == texts
    assert tok.encode_batch([]) == []


def test_save_load_equal_and_fingerprint_stable(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    loaded = Tokenizer.load(path)
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode_batch(TRICKY) == tok.encode_batch(TRICKY)
    assert Tokenizer.load(tmp_path / "sub").fingerprint() == tok.fingerprint()  # directory form
    # Training is deterministic; other data or another vocabulary size changes the hash.
    assert train_bpe(CORPUS, vocab_size=400).fingerprint() == tok.fingerprint()
    assert train_bpe(CORPUS, vocab_size=300).fingerprint() != tok.fingerprint()
    assert len(tok.fingerprint()) == 64


def test_fingerprint_covers_special_id_choice(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(path, pad_token=EOS_TOKEN).fingerprint() != tok.fingerprint()


def _neox_like_file(path, specials: list[str], eos_last: bool = True):
    """A tokenizer.json written by ``tokenizers`` itself, with OLMo/NeoX-style special tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    if eos_last:  # OLMo's <|endoftext|> sits at the end of the vocabulary
        backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    backend.save(str(path))
    return backend


def test_load_foreign_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    backend = _neox_like_file(path, ["|||IP_ADDRESS|||", PAD_TOKEN])
    tok = Tokenizer.load(path)
    assert tok.eos_id == backend.token_to_id(EOS_TOKEN) == backend.get_vocab_size() - 1
    assert tok.pad_id == backend.token_to_id(PAD_TOKEN) == 1
    text = "Zürich 🙂\tdone\n"
    assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


def test_load_uses_side_config_then_override(tmp_path):
    path = tmp_path / "tokenizer.json"
    backend = _neox_like_file(path, ["<s>", "</s>", "<unk>", "<mypad>"], eos_last=False)
    assert Tokenizer.load(path).eos_id == backend.token_to_id("</s>")
    assert Tokenizer.load(path).pad_id == backend.token_to_id("</s>")  # no pad token: eos pads
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<mypad>"}}))
    assert Tokenizer.load(path).pad_id == backend.token_to_id("<mypad>")
    overridden = Tokenizer.load(path, eos_token="<s>", pad_token=2)
    assert (overridden.eos_id, overridden.pad_id) == (backend.token_to_id("<s>"), 2)


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Tokenizer.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": {"type": "NotAModel"}}')
    with pytest.raises(TokenizerError, match="bad.json"):
        Tokenizer.load(bad)
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\xff not json")
    with pytest.raises(TokenizerError, match="garbage.json"):
        Tokenizer.load(garbage)


def test_load_without_known_eos_needs_override(tmp_path):
    path = tmp_path / "tokenizer.json"
    backend = _neox_like_file(path, ["[weird]"], eos_last=False)
    with pytest.raises(TokenizerError, match=r"eos_token=.*\[weird\]"):
        Tokenizer.load(path)
    assert Tokenizer.load(path, eos_token="[weird]").eos_id == backend.token_to_id("[weird]")
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        Tokenizer.load(path, eos_token="<nope>")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer.load(path, eos_token=10**6)


def test_train_rejects_bad_arguments():
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(TokenizerError, match="min_frequency"):
        train_bpe(CORPUS, vocab_size=300, min_frequency=0)
