"""Document filters: heuristic rules (one crafted failure per rule), exact and near dedup."""

import dataclasses
import string
import unicodedata

import numpy as np
import pytest

from jaxlm.config import ConfigError, from_dict
from jaxlm.data.filters import (
    EMPTY_HASH,
    HEURISTIC_PRESETS,
    ExactDuplicates,
    HeuristicRules,
    MinHashSettings,
    NearDuplicates,
    content_key,
    heuristic_rules,
    heuristic_verdict,
    minhash_signature,
    shingles,
)

RULES = [f.name for f in dataclasses.fields(HeuristicRules) if f.name != "c4_min_line_words"]
DUPLICATE_NGRAMS = [f"max_duplicate_{n}gram_char_fraction" for n in range(5, 11)]
NO_RULES = HeuristicRules(**{rule: None for rule in RULES if not rule.startswith("c4_")})  # C4 is off by default

PROSE = """The harbour town woke slowly on the first cold morning of the year. Fishing boats rocked against the wooden pier while gulls argued over scraps near the market stalls. An old man with a grey scarf opened his bakery and set out loaves that were still warm from the oven.

Across the square, the library had just installed new shelves. The librarian wanted every child in the district to have a quiet corner in which to read, so she arranged cushions beneath the tall windows and hung paper lanterns from the beams.

By noon the wind had changed direction. Clouds gathered over the hills to the west, and the ferry captain decided to leave an hour early. Passengers hurried along the quay with baskets of apples, bundles of letters and a crate of restless hens.

In the evening the rain finally arrived. People gathered in the small cafe beside the church, sharing soup and stories about storms their grandparents had survived. Nobody seemed worried; the town had weathered worse nights than this one, and the lamps along the harbour wall kept burning until dawn.
"""


def pseudo_word(rng: np.random.Generator, length: int) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=length))


def pseudo_words(rng: np.random.Generator, n: int, low: int = 5, high: int = 8) -> list[str]:
    """Random letter strings of ``low..high`` letters (too long to be a stop word)."""
    return [pseudo_word(rng, int(k)) for k in rng.integers(low, high + 1, size=n)]


def sentence_lines(rng, n_lines: int, n_words: int = 9, start: str = "The", end: str = ".") -> list[str]:
    return [" ".join([start, *pseudo_words(rng, n_words)]) + end for _ in range(n_lines)]


def failing_rules(text: str, rules: HeuristicRules) -> list[str]:
    """Every rule ``text`` fails, in check order: the verdict, then the verdict with it switched off, ..."""
    failed = []
    while (rule := heuristic_verdict(text, rules)) is not None:
        failed.append(rule)
        rules = dataclasses.replace(rules, **{rule: False if isinstance(getattr(rules, rule), bool) else None})
    return failed


def ngram_document(rng, phrase_words: int, repeats: int, total_words: int) -> str:
    """Six-letter pseudo-words, 12 a line, with one phrase of ``phrase_words`` words occurring
    ``repeats`` times between random fillers: every word has 6 characters, so a phrase's
    character fraction is its share of the words."""
    phrase = pseudo_words(rng, phrase_words, 6, 6)
    fillers = pseudo_words(rng, total_words - phrase_words * repeats, 6, 6)
    fillers[0] = "to-and"  # two stop words in six characters
    gap = len(fillers) // repeats
    words = []
    for i in range(repeats):
        words += fillers[i * gap : (i + 1) * gap] + phrase
    words += fillers[repeats * gap :]
    return "\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12))


def dup_line_char_document(rng) -> str:
    long_line = " ".join(pseudo_words(rng, 40)) + "."
    paragraphs = [sentence_lines(rng, 2, 7) for _ in range(6)]
    paragraphs[0].append(long_line)
    paragraphs[4].append(long_line)
    return "\n\n".join("\n".join(p) for p in paragraphs)


def dup_paragraph_char_document(rng) -> str:
    repeated = "\n".join(sentence_lines(rng, 2, 19))
    paragraphs = ["\n".join(sentence_lines(rng, 2, 7)) for _ in range(6)]
    return "\n\n".join(paragraphs[:2] + [repeated] + paragraphs[2:5] + [repeated] + paragraphs[5:])


SHORT_WORDS = "a an as at by do go he if in is it me my no on or so up us we ox hi oh am be to of".split()


def short_word_document(rng) -> str:
    return "\n".join(" ".join(rng.choice(SHORT_WORDS, size=8)) + "." for _ in range(12))


GOPHER, GOPHER_C4 = HEURISTIC_PRESETS["gopher"], HEURISTIC_PRESETS["gopher+c4"]

# (failing rules in check order, rules, document builder)
RULE_CASES = {
    "min_words": (
        ["min_words"],
        GOPHER_C4,
        lambda rng: "The harbour town woke slowly. Boats rocked against the pier. Gulls argued over scraps. "
        "A baker opened his shop. The morning was cold and bright.",
    ),
    "max_words": (["max_words"], heuristic_rules("gopher+c4", max_words=100), lambda rng: PROSE),
    "min_mean_word_length": (["min_mean_word_length"], GOPHER_C4, short_word_document),
    "max_mean_word_length": (
        ["max_mean_word_length"],
        GOPHER_C4,
        lambda rng: "\n".join("the " + " ".join(pseudo_words(rng, 7, 12, 12)) + "." for _ in range(8)),
    ),
    "max_symbol_word_ratio/hash": (
        ["max_symbol_word_ratio"],
        GOPHER_C4,
        lambda rng: PROSE + "\n" + " ".join("#" + w for w in pseudo_words(rng, 30)),
    ),
    "max_symbol_word_ratio/ellipsis": (
        ["max_symbol_word_ratio"],
        GOPHER_C4,
        lambda rng: PROSE + "\n" + " ".join(w + "..." for w in pseudo_words(rng, 30)),
    ),
    "min_stop_words": (
        ["min_stop_words"],
        GOPHER_C4,
        lambda rng: "\n".join(" ".join(pseudo_words(rng, 9)) + "." for _ in range(8)),
    ),
    "min_alpha_word_ratio": (
        ["min_alpha_word_ratio"],
        GOPHER_C4,
        lambda rng: PROSE + "\nThe tally read " + " ".join(map(str, rng.integers(1000, 99999, size=60))) + ".",
    ),
    "max_bullet_line_ratio": (
        ["max_bullet_line_ratio"],
        GOPHER_C4,
        lambda rng: "\n".join(sentence_lines(rng, 12, 8, start="- The")),
    ),
    "max_ellipsis_line_ratio": (
        ["max_ellipsis_line_ratio"],
        GOPHER_C4,
        lambda rng: "\n".join(sentence_lines(rng, 6) + sentence_lines(rng, 4, end="...")),
    ),
    "c4_lorem_ipsum": (
        ["c4_lorem_ipsum"],
        GOPHER_C4,
        lambda rng: PROSE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    ),
    "c4_curly_brace": (
        ["c4_curly_brace"],
        GOPHER_C4,
        lambda rng: PROSE + "\nThe template printed {name} where the title should have been.",
    ),
    "c4_min_sentences": (
        ["c4_min_sentences"],
        GOPHER_C4,
        lambda rng: "\n".join(sentence_lines(rng, 6, end="") + sentence_lines(rng, 2)),
    ),
    "max_duplicate_line_fraction": (
        ["max_duplicate_line_fraction"],
        GOPHER_C4,
        lambda rng: "\n\n".join(line + "\nRead more." for line in sentence_lines(rng, 10, 14)),
    ),
    "max_duplicate_line_char_fraction": (
        ["max_duplicate_line_char_fraction", *DUPLICATE_NGRAMS],
        GOPHER_C4,
        dup_line_char_document,
    ),
    "max_duplicate_paragraph_fraction": (
        ["max_duplicate_paragraph_fraction"],
        GOPHER_C4,
        lambda rng: "\n\n".join("\n".join(sentence_lines(rng, 4, 8)) + "\n\nRead more." for _ in range(5)),
    ),
    "max_duplicate_paragraph_char_fraction": (
        ["max_duplicate_line_char_fraction", "max_duplicate_paragraph_char_fraction", *DUPLICATE_NGRAMS],
        GOPHER_C4,
        dup_paragraph_char_document,
    ),
    # All six-letter words, so character fractions are word fractions:
    "max_top_2gram_char_fraction": (  # 2-gram 2*10/80 = 0.25
        ["max_top_2gram_char_fraction"], GOPHER, lambda rng: ngram_document(rng, 2, 10, 80)
    ),
    "max_top_3gram_char_fraction": (  # 3-gram 3*8/100 = 0.24, its 2-grams 0.16
        ["max_top_3gram_char_fraction"], GOPHER, lambda rng: ngram_document(rng, 3, 8, 100)
    ),
    "max_top_4gram_char_fraction": (  # 4-gram 4*5/100 = 0.20, 3-grams 0.15
        ["max_top_4gram_char_fraction"], GOPHER, lambda rng: ngram_document(rng, 4, 5, 100)
    ),
    "max_duplicate_5gram_char_fraction": (  # repeats 5*19/559 = 0.17, top 4-gram 4*20/559 = 0.143
        ["max_duplicate_5gram_char_fraction"], GOPHER, lambda rng: ngram_document(rng, 5, 20, 559)
    ),
    # An n-word phrase three times: repeats 2n/W, between the n-gram and the (n-1)-gram limits.
    **{
        f"max_duplicate_{n}gram_char_fraction": (
            [f"max_duplicate_{n}gram_char_fraction"],
            GOPHER,
            lambda rng, n=n: ngram_document(rng, n, 3, round(2 * n / (0.155 - 0.01 * (n - 5)))),
        )
        for n in range(6, 11)
    },
}


def test_normal_prose_passes_every_preset():
    for name, rules in HEURISTIC_PRESETS.items():
        assert heuristic_verdict(PROSE, rules) is None, name


@pytest.mark.parametrize("case", RULE_CASES)
def test_document_made_to_fail_a_rule_fails_exactly_that_rule(case):
    expected, rules, build = RULE_CASES[case]
    text = build(np.random.default_rng(0))
    assert heuristic_verdict(text, rules) == expected[0]
    assert failing_rules(text, rules) == expected  # switching the failed rules off lets it pass


def test_every_rule_has_a_failing_case_and_rules_are_checked_in_field_order():
    covered = {rule for expected, _, _ in RULE_CASES.values() for rule in expected}
    assert covered == set(RULES)
    for expected, _, _ in RULE_CASES.values():
        assert expected == sorted(expected, key=RULES.index)
    # Too short, no stop word, and no line C4 keeps (no end mark), so neither lorem ipsum nor "{" counts.
    assert failing_rules("lorem ipsum {x}", GOPHER_C4) == ["min_words", "min_stop_words", "c4_min_sentences"]
    assert failing_rules("### ...", GOPHER_C4) == [
        "min_words", "max_symbol_word_ratio", "min_stop_words", "min_alpha_word_ratio", "max_ellipsis_line_ratio",
        "c4_min_sentences",
    ]


def test_disabling_a_rule_lets_the_document_pass():
    short = "The boats rocked against the pier while the gulls argued over scraps of bread."
    assert heuristic_verdict(short, heuristic_rules("gopher")) == "min_words"
    assert heuristic_verdict(short, heuristic_rules("gopher", min_words=None)) is None
    assert heuristic_verdict(short, heuristic_rules("gopher", min_words=10)) is None
    assert heuristic_verdict(PROSE, heuristic_rules("gopher", max_words=100)) == "max_words"
    assert heuristic_verdict(PROSE, heuristic_rules("gopher", max_words=None)) is None


def test_empty_and_whitespace_documents():
    assert heuristic_verdict("", HEURISTIC_PRESETS["gopher"]) == "min_words"
    assert heuristic_verdict(" \n\n ", HEURISTIC_PRESETS["c4"]) == "c4_min_sentences"
    no_word_or_line_rules = dataclasses.replace(GOPHER, **{rule: None for rule in RULES[:9]})
    assert heuristic_verdict("", no_word_or_line_rules) is None


def test_presets():
    assert heuristic_rules("gopher") == HeuristicRules()
    assert not HeuristicRules().c4_lorem_ipsum and HeuristicRules().c4_min_sentences is None
    c4 = heuristic_rules("c4")
    assert c4.min_words is None and c4.max_top_2gram_char_fraction is None and c4.max_duplicate_line_fraction is None
    assert c4.c4_lorem_ipsum and c4.c4_curly_brace and c4.c4_min_sentences == 5
    both = heuristic_rules("gopher+c4", min_words=20)
    assert both.min_words == 20 and both.max_duplicate_10gram_char_fraction == 0.10 and both.c4_min_sentences == 5
    loaded = from_dict(HeuristicRules, {"min_words": 20.0, "max_words": None})  # the config loader reads its fields
    assert loaded == HeuristicRules(min_words=20, max_words=None)


def test_bad_preset_and_fields():
    with pytest.raises(ConfigError, match=r"unknown preset 'gohper'; valid presets: gopher, c4, gopher\+c4"):
        heuristic_rules("gohper")
    with pytest.raises(ConfigError, match=r"unknown field 'min_word'; valid fields: min_words, max_words"):
        heuristic_rules("gopher", min_word=10)
    bad = {
        "min_words": -1,
        "max_words": 1.5,
        "min_stop_words": True,
        "max_duplicate_line_fraction": 1.5,
        "max_top_2gram_char_fraction": -0.1,
        "max_symbol_word_ratio": "0.1",
        "c4_lorem_ipsum": None,
        "c4_min_line_words": None,
    }
    for field, value in bad.items():
        with pytest.raises(ConfigError, match=rf"^heuristic\.{field}: expected"):
            HeuristicRules(**{field: value})
    with pytest.raises(ConfigError, match=r"heuristic\.min_words: expected at most max_words \(10\), got 50"):
        HeuristicRules(max_words=10)
    with pytest.raises(ConfigError, match=r"heuristic\.min_mean_word_length"):
        HeuristicRules(min_mean_word_length=12.0)
    assert HeuristicRules(max_symbol_word_ratio=2.0).max_symbol_word_ratio == 2.0  # a ratio, not a fraction


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Word characters inside some n-gram that also starts earlier (each word counted once)."""
    covered, seen = set(), set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        if gram in seen:
            covered.update(range(i, i + n))
        seen.add(gram)
    return sum(len(words[i]) for i in covered) / sum(map(len, words))


@pytest.mark.parametrize("n", [5, 7, 10])
def test_duplicate_ngram_fraction_flips_the_verdict_at_its_value(n):
    """On repetitive text (random pieces of a few word sequences: repeats of every length, often
    overlapping) the rule fails exactly when its threshold is below the fraction of characters in
    repeated n-grams."""
    rng = np.random.default_rng(n)
    for _ in range(5):
        pieces = [list(rng.choice(["ab", "cde", "fghi", "j"], size=int(k))) for k in rng.integers(3, 16, size=4)]
        words = [w for i in rng.integers(0, 4, size=12) for w in pieces[i]]
        fraction = repeated_ngram_fraction(words, n)
        assert 0 < fraction < 1
        name = f"max_duplicate_{n}gram_char_fraction"
        text = " ".join(words)
        assert heuristic_verdict(text, dataclasses.replace(NO_RULES, **{name: fraction - 1e-9})) == name
        assert heuristic_verdict(text, dataclasses.replace(NO_RULES, **{name: fraction})) is None


# ---------------------------------------------------------------------------------------
# Exact dedup
# ---------------------------------------------------------------------------------------


def test_content_key_normalisation():
    text = "The Harbour  Town\n\twoke slowly. "
    variants = ["the harbour town woke slowly.", "  THE HARBOUR TOWN WOKE SLOWLY.", "The\nHarbour\u00a0Town  woke"
                " slowly."]
    assert len(content_key(text)) == 16
    for variant in variants:
        assert content_key(variant) == content_key(text)
        assert content_key(variant, normalize=False) != content_key(text, normalize=False)
    composed, decomposed = "café au lait", unicodedata.normalize("NFD", "café au lait")
    assert composed != decomposed and content_key(composed) == content_key(decomposed)
    assert content_key(composed, normalize=False) != content_key(decomposed, normalize=False)
    assert content_key("the harbour town woke slowly") != content_key(text)


def test_exact_duplicates_first_occurrence_wins():
    index = ExactDuplicates()
    keys = [content_key(t) for t in ["One fish.", "Two fish.", "one  FISH.", "Red fish.", "two fish."]]
    assert [index.seen(k) for k in keys] == [False, False, True, False, True]
    assert len(index) == 3


# ---------------------------------------------------------------------------------------
# Near dedup
# ---------------------------------------------------------------------------------------

VOCAB = pseudo_words(np.random.default_rng(7), 5000, 3, 9)


def random_text(rng, n_words: int) -> str:
    return " ".join(rng.choice(VOCAB, size=n_words))


def test_planted_near_duplicates_are_found_and_nothing_else():
    rng = np.random.default_rng(3)
    settings = MinHashSettings()
    docs = [(f"doc{i}", random_text(rng, int(rng.integers(100, 400)))) for i in range(200)]
    expected = {}
    for c in range(3):  # three originals, each with three near copies placed after it
        original = random_text(rng, 300).split()
        changed = list(original)
        for position in (80, 210):
            changed[position] = "replaced"
        variants = [
            " ".join(changed),
            " ".join(original) + " And then the story went on for one more sentence.",
            " ".join(original) + ". A different ending was written here instead.",
        ]
        start = int(rng.integers(0, 100))
        docs.insert(start, (f"original{c}", " ".join(original)))
        for v, text in enumerate(variants):
            position = int(rng.integers(start + 1, len(docs) + 1))
            docs.insert(position, (f"copy{c}.{v}", text))
            expected[f"copy{c}.{v}"] = f"original{c}"
    index = NearDuplicates(settings)
    found = {key: index.check_and_add(key, minhash_signature(text, settings)) for key, text in docs}
    assert {key: match for key, match in found.items() if match is not None} == expected
    assert len(index) == len(docs) - len(expected)  # duplicates are not indexed


def test_a_bucket_hit_needs_a_verified_jaccard_and_the_closest_earlier_document_wins():
    rng = np.random.default_rng(6)
    settings = MinHashSettings()  # 128 positions, threshold 0.8
    a = rng.integers(0, 2**63, size=128, dtype=np.uint64)

    def differing(base, positions):
        changed = base.copy()
        changed[positions] = rng.integers(0, 2**63, size=len(positions), dtype=np.uint64)
        return changed

    index = NearDuplicates(settings)
    assert index.check_and_add("a", a) is None
    # Same first half (so same first LSH band), estimated Jaccard 0.5: a candidate, not a duplicate.
    assert index.check_and_add("half", differing(a, np.arange(64, 128))) is None
    c = differing(a, np.arange(90, 120))  # agrees with a on 98/128 = 0.77: indexed too
    assert index.check_and_add("c", c) is None
    q = a.copy()
    q[90:110] = c[90:110]  # agrees with a on 108/128 = 0.84, with c on 118/128 = 0.92
    assert index.check_and_add("q", q) == "c"
    assert index.check_and_add("a again", a.copy()) == "a"
    assert len(index) == 3


def test_signatures_are_deterministic_and_seeded():
    text = random_text(np.random.default_rng(4), 200)
    settings = MinHashSettings()
    signature = minhash_signature(text, settings)
    assert signature.dtype == np.uint64 and signature.shape == (128,)
    assert np.array_equal(signature, minhash_signature(text, MinHashSettings()))
    assert np.array_equal(signature, minhash_signature(text.upper().replace(" ", "  \n"), settings))
    assert not np.array_equal(signature, minhash_signature(text, MinHashSettings(seed=2)))
    assert minhash_signature(text, MinHashSettings(num_perm=64)).shape == (64,)


def test_estimated_jaccard_tracks_true_shingle_jaccard():
    rng = np.random.default_rng(5)
    settings = MinHashSettings(num_perm=256)
    base = random_text(rng, 300).split()
    for replaced in (5, 15, 30, 60):
        other = list(base)
        for position in rng.choice(300, size=replaced, replace=False):
            other[position] = str(rng.choice(VOCAB))
        a, b = set(shingles(" ".join(base), 5)), set(shingles(" ".join(other), 5))
        true = len(a & b) / len(a | b)
        estimate = np.mean(minhash_signature(" ".join(base), settings) == minhash_signature(" ".join(other), settings))
        assert abs(estimate - true) < 0.1, (replaced, true, estimate)


def test_shingles_of_short_and_empty_texts():
    assert shingles("  The Quick  brown fox ", 5) == [b"the quick brown fox"]
    assert shingles("a b c d e f", 5) == [b"a b c d e", b"b c d e f"]
    assert shingles(" \n ", 5) == []
    settings = MinHashSettings()
    index = NearDuplicates(settings)
    assert index.check_and_add("a", minhash_signature("Hello there, world", settings)) is None
    assert index.check_and_add("b", minhash_signature("hello  there, WORLD", settings)) == "a"
    assert index.check_and_add("c", minhash_signature("hello there world", settings)) is None


def test_empty_text_matches_nothing():
    settings = MinHashSettings()
    empty = minhash_signature("", settings)
    assert np.all(empty == EMPTY_HASH)
    index = NearDuplicates(settings)
    assert index.check_and_add("e1", empty) is None
    assert index.check_and_add("e2", minhash_signature("   ", settings)) is None
    assert index.check_and_add("word", minhash_signature("word", settings)) is None
    assert len(index) == 1


def test_bad_settings_and_signatures():
    for field, value in [("num_perm", 1), ("num_perm", 64.0), ("ngram", 0), ("threshold", 1.0), ("seed", -1)]:
        with pytest.raises(ConfigError, match=rf"^near_dedup\.{field}: expected"):
            MinHashSettings(**{field: value})
    with pytest.raises(ConfigError, match=r"^near_dedup: no LSH index for threshold=0.99, num_perm=16"):
        NearDuplicates(MinHashSettings(num_perm=16, threshold=0.99))
    index = NearDuplicates(MinHashSettings())
    with pytest.raises(ValueError, match=r"expected a uint64 \[128\] signature"):
        index.check_and_add("x", np.zeros(64, dtype=np.uint64))
