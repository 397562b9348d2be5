"""Document filters for ``jaxlm data prepare``: heuristic quality rules, exact and near dedup.

Each filter has a per-document part, a pure function of the text that runs in worker processes
(``heuristic_verdict``, ``content_key``, ``minhash_signature``), and, for dedup, a stateful
index that the main process feeds in document order (``ExactDuplicates``, ``NearDuplicates``).

Heuristic rules follow Gopher (Rae et al. 2021, MassiveText quality and repetition filters) and
the document-level part of C4 (Raffel et al. 2020). They only judge a document, never rewrite
it. Conventions, where the papers leave room:

- words: the text split on whitespace (Gopher used a tokenizer), so punctuation stays attached;
- lines: the text split on ``\\n``, stripped, blank ones ignored; paragraphs: split on blank lines;
- n-gram character fractions count the characters of words (whitespace excluded) over all
  word characters, and count each word once even where repeated n-grams overlap.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Iterator

import numpy as np

from jaxlm.config import ConfigError

# ---------------------------------------------------------------------------------------
# Heuristic quality rules
# ---------------------------------------------------------------------------------------

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("-", "*", "•", "●", "◦", "▪", "‣", "–")
ELLIPSES = ("...", "…")
C4_END_MARKS = (".", "?", "!", '"', "”")
C4_POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
C4_MAX_WORD_LENGTH = 1000  # C4 drops lines holding a longer word

_STOP_WORD = re.compile(r"(?<!\w)(?:" + "|".join(STOP_WORDS) + r")(?!\w)", re.IGNORECASE)
_LETTER = re.compile(r"[^\W\d_]")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_C4_UNCOUNTED = re.compile("|".join(map(re.escape, ("javascript", *C4_POLICY_PHRASES))))

_TOP_NGRAMS = (2, 3, 4)
_DUPLICATE_NGRAMS = (5, 6, 7, 8, 9, 10)
_COUNT_FIELDS = ("min_words", "max_words", "min_stop_words", "c4_min_sentences", "c4_min_line_words")
_FLAG_FIELDS = ("c4_lorem_ipsum", "c4_curly_brace")
_UNBOUNDED_FIELDS = ("min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio")


@dataclasses.dataclass(frozen=True)
class HeuristicRules:
    """Thresholds of the heuristic document rules; None (or False) switches a rule off.

    ``heuristic_verdict`` checks the rules in field order (cheap ones first) and names the first
    that fails by its field name. Defaults are the Gopher values with the C4 rules off.

    - ``min_words`` / ``max_words``: whitespace-separated word count.
    - ``min_mean_word_length`` / ``max_mean_word_length``: mean characters per word.
    - ``max_symbol_word_ratio``: ``#`` per word, and separately ellipses (``...``, ``…``) per word.
    - ``min_stop_words``: occurrences of ``STOP_WORDS`` (case-insensitive, punctuation around them
      ignored).
    - ``min_alpha_word_ratio``: share of words holding at least one letter.
    - ``max_bullet_line_ratio`` / ``max_ellipsis_line_ratio``: share of lines starting with one of
      ``BULLETS`` / ending with an ellipsis.
    - ``c4_*``: C4 looks only at the lines it keeps (ending in one of ``C4_END_MARKS`` but not an
      ellipsis, at least ``c4_min_line_words`` words, none longer than ``C4_MAX_WORD_LENGTH``).
      ``c4_lorem_ipsum`` / ``c4_curly_brace``: a kept line holds "lorem ipsum" / ``{``;
      ``c4_min_sentences``: fewer sentences in the kept lines, leaving out those that mention
      "javascript" or a ``C4_POLICY_PHRASES`` phrase (a sentence ends in ``.``, ``!`` or ``?``
      before whitespace; a kept line counts at least one). ``c4_min_line_words`` is a parameter
      of these rules, never a verdict.
    - ``max_duplicate_{line,paragraph}_fraction``: share of lines / paragraphs that repeat an
      earlier one; ``..._char_fraction``: their share of the characters.
    - ``max_top_{n}gram_char_fraction``: characters covered by the most frequent n-gram (one that
      occurs at least twice; ties go to the longer); ``max_duplicate_{n}gram_char_fraction``:
      characters covered by n-grams that repeat an earlier occurrence.
    """

    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    min_stop_words: int | None = 2
    min_alpha_word_ratio: float | None = 0.8
    max_bullet_line_ratio: float | None = 0.9
    max_ellipsis_line_ratio: float | None = 0.3
    c4_lorem_ipsum: bool = False
    c4_curly_brace: bool = False
    c4_min_sentences: int | None = None
    c4_min_line_words: int = 3
    max_duplicate_line_fraction: float | None = 0.3
    max_duplicate_line_char_fraction: float | None = 0.2
    max_duplicate_paragraph_fraction: float | None = 0.3
    max_duplicate_paragraph_char_fraction: float | None = 0.2
    max_top_2gram_char_fraction: float | None = 0.20
    max_top_3gram_char_fraction: float | None = 0.18
    max_top_4gram_char_fraction: float | None = 0.16
    max_duplicate_5gram_char_fraction: float | None = 0.15
    max_duplicate_6gram_char_fraction: float | None = 0.14
    max_duplicate_7gram_char_fraction: float | None = 0.13
    max_duplicate_8gram_char_fraction: float | None = 0.12
    max_duplicate_9gram_char_fraction: float | None = 0.11
    max_duplicate_10gram_char_fraction: float | None = 0.10

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_threshold(field.name, getattr(self, field.name))
        for low, high in (("min_words", "max_words"), ("min_mean_word_length", "max_mean_word_length")):
            low_value, high_value = getattr(self, low), getattr(self, high)
            if low_value is not None and high_value is not None and low_value > high_value:
                raise ConfigError(f"heuristic.{low}: expected at most {high} ({high_value}), got {low_value}")


def _check_threshold(name: str, value: object) -> None:
    where = f"heuristic.{name}"
    if name in _FLAG_FIELDS:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return
    if value is None and name != "c4_min_line_words":
        return
    if name in _COUNT_FIELDS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}: expected an integer >= 0, got {value!r}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")
    if name not in _UNBOUNDED_FIELDS and value > 1:
        raise ConfigError(f"{where}: expected a fraction in [0, 1], got {value!r}")


_GOPHER_RULES = tuple(f.name for f in dataclasses.fields(HeuristicRules) if not f.name.startswith("c4_"))
_C4_ON = {"c4_lorem_ipsum": True, "c4_curly_brace": True, "c4_min_sentences": 5}

HEURISTIC_PRESETS: dict[str, HeuristicRules] = {
    "gopher": HeuristicRules(),
    "c4": HeuristicRules(**dict.fromkeys(_GOPHER_RULES), **_C4_ON),
    "gopher+c4": HeuristicRules(**_C4_ON),
}


def heuristic_rules(preset: str, **overrides: object) -> HeuristicRules:
    """The rules of ``preset`` (a ``HEURISTIC_PRESETS`` name) with some fields changed."""
    if preset not in HEURISTIC_PRESETS:
        raise ConfigError(f"heuristic.preset: unknown preset {preset!r}; valid presets: {', '.join(HEURISTIC_PRESETS)}")
    names = [f.name for f in dataclasses.fields(HeuristicRules)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"heuristic: unknown field {', '.join(map(repr, unknown))}; valid fields: {', '.join(names)}")
    return dataclasses.replace(HEURISTIC_PRESETS[preset], **overrides)


def heuristic_verdict(text: str, rules: HeuristicRules) -> str | None:
    """None when ``text`` passes ``rules``, else the field name of the first rule it fails."""
    words = text.split()
    lines = [stripped for line in text.split("\n") if (stripped := line.strip())]
    return (
        _word_rules(text, words, rules)
        or _line_rules(lines, rules)
        or _c4_rules(lines, rules)
        or _repetition_rules(text, lines, rules)
        or _ngram_rules(words, rules)
    )


def _word_rules(text: str, words: list[str], rules: HeuristicRules) -> str | None:
    n = len(words)
    if rules.min_words is not None and n < rules.min_words:
        return "min_words"
    if rules.max_words is not None and n > rules.max_words:
        return "max_words"
    mean_length = sum(map(len, words)) / max(n, 1)
    if rules.min_mean_word_length is not None and mean_length < rules.min_mean_word_length:
        return "min_mean_word_length"
    if rules.max_mean_word_length is not None and mean_length > rules.max_mean_word_length:
        return "max_mean_word_length"
    if rules.max_symbol_word_ratio is not None:
        ellipses = sum(text.count(e) for e in ELLIPSES)
        if max(text.count("#"), ellipses) / max(n, 1) > rules.max_symbol_word_ratio:
            return "max_symbol_word_ratio"
    if rules.min_stop_words is not None:
        found = sum(1 for _ in itertools.islice(_STOP_WORD.finditer(text), rules.min_stop_words))
        if found < rules.min_stop_words:
            return "min_stop_words"
    if rules.min_alpha_word_ratio is not None:
        alphabetic = sum(1 for word in words if _LETTER.search(word))
        if (alphabetic / n if n else 0.0) < rules.min_alpha_word_ratio:
            return "min_alpha_word_ratio"
    return None


def _line_rules(lines: list[str], rules: HeuristicRules) -> str | None:
    n = max(len(lines), 1)
    if rules.max_bullet_line_ratio is not None:
        if sum(line.startswith(BULLETS) for line in lines) / n > rules.max_bullet_line_ratio:
            return "max_bullet_line_ratio"
    if rules.max_ellipsis_line_ratio is not None:
        if sum(line.endswith(ELLIPSES) for line in lines) / n > rules.max_ellipsis_line_ratio:
            return "max_ellipsis_line_ratio"
    return None


def _c4_rules(lines: list[str], rules: HeuristicRules) -> str | None:
    if not (rules.c4_lorem_ipsum or rules.c4_curly_brace or rules.c4_min_sentences is not None):
        return None
    lorem_ipsum = curly_brace = False
    sentences = 0
    for line in lines:
        if not line.endswith(C4_END_MARKS) or line.endswith(ELLIPSES):
            continue
        words = line.split()
        if len(words) < rules.c4_min_line_words:
            continue
        if len(line) > C4_MAX_WORD_LENGTH and max(map(len, words)) > C4_MAX_WORD_LENGTH:
            continue
        lower = line.lower()
        lorem_ipsum = lorem_ipsum or "lorem ipsum" in lower
        curly_brace = curly_brace or "{" in line
        if not _C4_UNCOUNTED.search(lower):
            sentences += max(1, len(_SENTENCE_END.findall(line)))
    if rules.c4_lorem_ipsum and lorem_ipsum:
        return "c4_lorem_ipsum"
    if rules.c4_curly_brace and curly_brace:
        return "c4_curly_brace"
    if rules.c4_min_sentences is not None and sentences < rules.c4_min_sentences:
        return "c4_min_sentences"
    return None


def _repetition_rules(text: str, lines: list[str], rules: HeuristicRules) -> str | None:
    line_limits = (rules.max_duplicate_line_fraction, rules.max_duplicate_line_char_fraction)
    if line_limits != (None, None):
        failed = _duplicate_rule("line", lines, line_limits)
        if failed is not None:
            return failed
    paragraph_limits = (rules.max_duplicate_paragraph_fraction, rules.max_duplicate_paragraph_char_fraction)
    if paragraph_limits != (None, None):
        paragraphs = [stripped for part in _PARAGRAPH_BREAK.split(text) if (stripped := part.strip())]
        return _duplicate_rule("paragraph", paragraphs, paragraph_limits)
    return None


def _duplicate_rule(unit: str, items: list[str], limits: tuple[float | None, float | None]) -> str | None:
    for suffix, limit, fraction in zip(("fraction", "char_fraction"), limits, _duplicate_fractions(items)):
        if limit is not None and fraction > limit:
            return f"max_duplicate_{unit}_{suffix}"
    return None


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items equal to an earlier one, their share of all characters)."""
    seen: set[str] = set()
    repeated = repeated_chars = total_chars = 0
    for item in items:
        total_chars += len(item)
        if item in seen:
            repeated += 1
            repeated_chars += len(item)
        else:
            seen.add(item)
    return repeated / max(len(items), 1), repeated_chars / max(total_chars, 1)


def _ngram_rules(words: list[str], rules: HeuristicRules) -> str | None:
    limits = {n: getattr(rules, f"max_top_{n}gram_char_fraction") for n in _TOP_NGRAMS}
    limits |= {n: getattr(rules, f"max_duplicate_{n}gram_char_fraction") for n in _DUPLICATE_NGRAMS}
    active = [n for n, limit in limits.items() if limit is not None and n <= len(words)]
    if not active:
        return None
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    for n, grams, first in _ngram_ids(words, max(active)):
        if n not in active:
            continue
        if n in _TOP_NGRAMS:
            covered, name = _top_ngram_chars(grams, first, n, lengths), f"max_top_{n}gram_char_fraction"
        else:
            covered, name = _duplicate_ngram_chars(grams, first, n, lengths), f"max_duplicate_{n}gram_char_fraction"
        if covered / total > limits[n]:
            return name
    return None


def _ngram_ids(words: list[str], max_n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(n, ids, first)`` for n = 2..max_n: ``ids[i]`` numbers the n-gram starting at word i
    (equal n-grams, equal ids) and ``first[id]`` is where that n-gram first starts."""
    index: dict[str, int] = {}
    word_ids = np.fromiter((index.setdefault(w, len(index)) for w in words), dtype=np.int64, count=len(words))
    ids = word_ids
    for n in range(2, max_n + 1):
        pairs = ids[:-1] * len(index) + word_ids[n - 1 :]  # (n-1)-gram id, next word: exact, < len(words)**2
        _, first, ids = np.unique(pairs, return_index=True, return_inverse=True)
        yield n, ids, first


def _covered_chars(starts: np.ndarray, n: int, lengths: np.ndarray) -> int:
    """Characters of the words inside at least one of the n-grams starting at ``starts``."""
    m = len(lengths)
    depth = np.cumsum(np.bincount(starts, minlength=m + 1) - np.bincount(starts + n, minlength=m + 1))
    return int(lengths[depth[:m] > 0].sum())


def _top_ngram_chars(grams: np.ndarray, first: np.ndarray, n: int, lengths: np.ndarray) -> int:
    counts = np.bincount(grams)
    if counts.max() < 2:
        return 0
    ends = np.concatenate(([0], np.cumsum(lengths)))
    chars = ends[first + n] - ends[first]
    top = int(np.argmax(counts * (int(chars.max()) + 1) + chars))
    return _covered_chars(np.flatnonzero(grams == top), n, lengths)


def _duplicate_ngram_chars(grams: np.ndarray, first: np.ndarray, n: int, lengths: np.ndarray) -> int:
    repeats = np.flatnonzero(first[grams] != np.arange(len(grams)))
    return _covered_chars(repeats, n, lengths) if len(repeats) else 0


# ---------------------------------------------------------------------------------------
# Exact dedup
# ---------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFC, lowercase, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split())


def content_key(text: str, normalize: bool = True) -> bytes:
    """16-byte blake2b digest of ``text`` (of ``normalize_text(text)`` with ``normalize``)."""
    return hashlib.blake2b((normalize_text(text) if normalize else text).encode("utf-8"), digest_size=16).digest()


class ExactDuplicates:
    """The content keys seen so far."""

    def __init__(self) -> None:
        self._keys: set[bytes] = set()

    def seen(self, key: bytes) -> bool:
        """True when ``key`` was seen before; else records it and returns False."""
        if key in self._keys:
            return True
        self._keys.add(key)
        return False

    def __len__(self) -> int:
        return len(self._keys)


# ---------------------------------------------------------------------------------------
# Near dedup: MinHash-LSH
# ---------------------------------------------------------------------------------------

_SCHEME = "affine64"  # datasketch's 64-bit permutations: uint64 signatures
EMPTY_HASH = np.uint64(2**64 - 1)  # every value of an empty text's signature


@dataclasses.dataclass(frozen=True)
class MinHashSettings:
    """MinHash over word ``ngram`` shingles of the normalised text; near duplicates are
    documents whose estimated Jaccard similarity is at least ``threshold``."""

    num_perm: int = 128
    ngram: int = 5
    threshold: float = 0.8
    seed: int = 1

    def __post_init__(self) -> None:
        for name, expected, valid in (
            ("num_perm", "an integer >= 2", lambda v: v >= 2),
            ("ngram", "an integer >= 1", lambda v: v >= 1),
            ("seed", "an integer in [0, 2**32)", lambda v: 0 <= v < 2**32),  # numpy RandomState seeds
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not valid(value):
                raise ConfigError(f"near_dedup.{name}: expected {expected}, got {value!r}")
        threshold = self.threshold
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold < 1:
            raise ConfigError(f"near_dedup.threshold: expected a Jaccard similarity in (0, 1), got {threshold!r}")


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> np.ndarray:
    """datasketch's permutation parameters for (num_perm, seed), made once (they are slow to draw)."""
    from datasketch import MinHash

    permutations = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
    permutations.flags.writeable = False
    return permutations


def _minhash(settings: MinHashSettings, signature: np.ndarray | None = None):
    """A ``datasketch.MinHash`` of ``settings``: empty, or holding ``signature``."""
    from datasketch import MinHash

    permutations = _permutations(settings.num_perm, settings.seed)
    return MinHash(settings.num_perm, settings.seed, hashvalues=signature, permutations=permutations, scheme=_SCHEME)


def shingles(text: str, ngram: int) -> list[bytes]:
    """The word ``ngram``-grams of ``normalize_text(text)`` (UTF-8, words joined by a space); a
    text of fewer words is one shingle, an empty text none."""
    words = normalize_text(text).split(" ")
    if words == [""]:
        return []
    if len(words) <= ngram:
        return [" ".join(words).encode("utf-8")]
    return [" ".join(words[i : i + ngram]).encode("utf-8") for i in range(len(words) - ngram + 1)]


def minhash_signature(text: str, settings: MinHashSettings) -> np.ndarray:
    """uint64 ``[num_perm]`` MinHash of the shingles of ``text`` (datasketch, SHA-1 shingle hashes).

    An empty text has no shingles: its signature is all ``EMPTY_HASH``, which ``NearDuplicates``
    never matches nor indexes.
    """
    minhash = _minhash(settings)
    minhash.update_batch(shingles(text, settings.ngram))
    return minhash.hashvalues


class NearDuplicates:
    """A MinHash-LSH index (``datasketch.MinHashLSH``; bands and rows chosen by datasketch from
    threshold and num_perm) of the documents seen so far that were not near duplicates.

    LSH bucket hits are candidates only: a document is a duplicate of the earlier one whose
    signature agrees on the most positions, if that estimated Jaccard is >= threshold.
    """

    def __init__(self, settings: MinHashSettings) -> None:
        from datasketch import MinHashLSH

        self.settings = settings
        try:
            self._lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm)
        except ValueError as err:
            raise ConfigError(
                f"near_dedup: no LSH index for threshold={settings.threshold}, num_perm={settings.num_perm} ({err})"
            ) from None
        self._keys: list[str] = []
        self._signatures = np.empty((64, settings.num_perm), dtype=np.uint64)  # rows: indexed docs; grows by doubling

    def __len__(self) -> int:
        return len(self._keys)

    def check_and_add(self, key: str, signature: np.ndarray) -> str | None:
        """The key of an indexed near duplicate of this document; else None, after indexing it."""
        num_perm = self.settings.num_perm
        if signature.shape != (num_perm,) or signature.dtype != np.uint64:
            raise ValueError(f"expected a uint64 [{num_perm}] signature, got {signature.dtype} {signature.shape}")
        if np.all(signature == EMPTY_HASH):
            return None
        minhash = _minhash(self.settings, signature)
        candidates = np.sort(np.fromiter(self._lsh.query(minhash), dtype=np.int64))
        if len(candidates):
            agree = np.count_nonzero(self._signatures[candidates] == signature, axis=1)
            best = int(np.argmax(agree))
            if agree[best] / num_perm >= self.settings.threshold:
                return self._keys[candidates[best]]
        row = len(self._keys)
        if row == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[row] = signature
        self._keys.append(key)
        self._lsh.insert(row, minhash, check_duplication=False)
        return None
