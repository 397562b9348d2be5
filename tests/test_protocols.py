import json

import numpy as np
import pytest

from jaxlm import model
from jaxlm.config import model_preset
from jaxlm.evaluate import protocols
from jaxlm.intervene import Intervention

CFG = model_preset("tiny", max_seq_len=96)


class ByteTokenizer:
    """UTF-8 bytes as token ids; 0 is end-of-document, 1 padding (never produced by text)."""

    eos_id, pad_id = 0, 1

    def encode_batch(self, texts):
        return [[b for b in t.encode() if b > 1] for t in texts]

    def decode(self, ids):
        return bytes(i for i in ids if i > 1).decode("utf-8", errors="replace")


def vowel_share(texts):
    """A stand-in scorer in [0, 1]: the share of vowels among letters."""
    out = []
    for t in texts:
        letters = [c for c in t.lower() if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, 0)


def test_toxicity_metrics_on_hand_made_cases():
    m = protocols.toxicity_metrics([[0.1, 0.7], [0.2, 0.3], [0.5]])
    assert m["expected_max_toxicity"] == pytest.approx((0.7 + 0.3 + 0.5) / 3)
    assert m["toxicity_probability"] == pytest.approx(2 / 3)  # 0.5 counts as toxic
    assert m["mean_toxicity"] == pytest.approx((0.1 + 0.7 + 0.2 + 0.3 + 0.5) / 5)
    assert m["n_prompts"] == 3 and m["n_samples"] == 5
    assert protocols.toxicity_metrics([])["expected_max_toxicity"] is None


def test_toxigen_parser():
    from jaxlm.data.labelled import LabelledDataError, split_toxigen_prompt, toxigen_prompt_text

    line = "- first statement\\n- second one\\n-"
    assert toxigen_prompt_text(line) == "- first statement\n- second one\n-"
    assert toxigen_prompt_text("- only one\\n") == "- only one\n-"
    assert split_toxigen_prompt(line) == ["first statement", "second one"]  # the probing view of the same line
    with pytest.raises(LabelledDataError, match="must start with '-'"):
        toxigen_prompt_text("no dash here\\n-")


def test_toxigen_reader_names_the_bad_line(tmp_path):
    (tmp_path / "hate_g_1k.txt").write_text("- fine\\n-\nno dash\\n-\n")
    with pytest.raises(protocols.EvaluationError, match=r"hate_g_1k.txt:2: not a ToxiGen prompt"):
        protocols.read_toxigen(tmp_path)


def by_rank(stem, count):
    """``count`` sentences ``f"{stem} {i}"`` in ToxiGen's held-out order (``toxigen_rank``): in a file
    of ``n`` of them, the first ``ceil(0.3 n)`` are the ones it holds out."""
    from jaxlm.data.labelled import toxigen_rank

    return sorted((f"{stem} {i}" for i in range(count)), key=toxigen_rank)


def check_split(directory, held, probed):
    """The fixture's sentences are held out (or not) as it means them to be."""
    from jaxlm.data.labelled import toxigen_split

    _, held_out = toxigen_split(directory)
    assert set(held) <= held_out and held_out.isdisjoint(probed)


def prompt_line(*sentences):
    return "\\n".join(f"- {s}" for s in sentences) + "\\n-"


def write_toxigen(directory):
    """Three files with two, one and one held-out sentences, mixed with probe-part ones."""
    directory.mkdir()
    ranked = by_rank("toxigen", 7)
    held, probed = ranked[:4], ranked[4:]  # in every file below, each held sentence ranks before each probed one
    (directory / "hate_groupa_1k.txt").write_text(prompt_line(held[0], probed[0]) + "\n" + prompt_line(probed[1], held[1], held[0]) + "\n")
    (directory / "neutral_groupa_1k.txt").write_text(prompt_line(held[2]) + "\n")
    (directory / "neutral_groupb_1k.txt").write_text(prompt_line(probed[2], held[3]) + "\n")
    (directory / "README.md").write_text("ignored")
    check_split(directory, held, probed)
    return held, probed


def test_toxigen_prompts_hold_only_held_out_sentences(tmp_path):
    from jaxlm.data.labelled import split_toxigen_prompt

    directory = tmp_path / "tg"
    directory.mkdir()
    ranked = by_rank("toxigen", 76)
    held, probed = ranked[:23], ranked[23:]  # the hate file holds out ceil(0.3 * 76) == 23 sentences
    mixed = probed[:20] + held + probed[20:]
    lines = [prompt_line(*mixed[i : i + 3]) for i in range(0, len(mixed), 3)] + [prompt_line(*held[:4])]
    (directory / "hate_g_1k.txt").write_text("\n".join(lines) + "\n")
    # 12 unique sentences hold out ceil(0.3 * 12) == 4 on their own: held[4:7] are held out by the hate file
    (directory / "neutral_g_1k.txt").write_text("\n".join(prompt_line(s) for s in probed[:5] + held[:7]) + "\n")
    check_split(directory, held, probed)

    def sentences(prompt):
        assert prompt.text.endswith("\n-") and all(line.startswith("- ") for line in prompt.text.split("\n")[:-1])
        return split_toxigen_prompt(prompt.text.replace("\n", "\\n"))

    prompts = protocols.read_toxigen(directory, seed=4)
    hate = [sentences(p) for p in prompts if p.label == "hate"]
    neutral = [sentences(p) for p in prompts if p.label == "neutral"]
    assert len(hate) == 23 // 5 and len(neutral) == 7 // 5 and {p.group for p in prompts} == {"g"}
    assert all(len(s) == 5 and len(set(s)) == 5 for s in hate + neutral)
    used = [s for chunk in hate for s in chunk]
    assert len(set(used)) == len(used) and set(used) <= set(held)  # disjoint chunks of held-out sentences
    assert {s for chunk in neutral for s in chunk} <= set(held[:7])  # held out by either file
    assert not set(probed) & {s for chunk in hate + neutral for s in chunk}
    assert protocols.read_toxigen(directory, seed=4) == prompts
    assert protocols.read_toxigen(directory, seed=5) != prompts

    assert protocols.read_toxigen(directory, limit=2, seed=4)[:2] == prompts[:2]  # the first chunks
    many = [sentences(p) for p in protocols.read_toxigen(directory, limit=9, seed=4, sentences_per_prompt=6)]
    assert len(many) == 18 and all(len(s) == len(set(s)) == 6 for s in many)  # reuse across, never within
    assert len({s for chunk in many[:9] for s in chunk}) < 9 * 6
    two = [sentences(p) for p in protocols.read_toxigen(directory, sentences_per_prompt=2)]
    assert len(two) == 23 // 2 + 7 // 2

    (directory / "neutral_g_1k.txt").write_text(prompt_line(*probed[:3]) + "\n")
    # only sentences the hate file leaves for probes: this file still holds out its first-ranked one
    assert [sentences(p) for p in protocols.read_toxigen(directory) if p.label == "neutral"] == [[probed[0]]]
    (directory / "neutral_g_1k.txt").write_text("\n-\n")  # no sentence at all
    with pytest.raises(protocols.EvaluationError, match=r"neutral_g_1k.txt: no ToxiGen prompt sentences"):
        protocols.read_toxigen(directory)
    with pytest.raises(protocols.EvaluationError, match="sentences_per_prompt: expected an integer >= 1"):
        protocols.read_toxigen(directory, sentences_per_prompt=0)


def write_rtp(directory):
    """Prompts of RTP's "eval" part (what read_rtp gives by default)."""
    directory.mkdir()
    for label, texts in (("toxic", ["You idiot", "What the"]), ("nontoxic", ["The sun", "My dog", "Good morning"])):
        with (directory / f"{label}.jsonl").open("w") as f:
            for t in texts:
                f.write(json.dumps({"prompt": {"text": t, "toxicity": 0.9 if label == "toxic" else 0.1}}) + "\n")


def test_readers(tmp_path):
    held, _ = write_toxigen(tmp_path / "tg")
    prompts = protocols.read_toxigen(tmp_path / "tg")  # fewer held-out sentences than 5: one prompt of them all
    assert [(p.label, p.group) for p in prompts] == [("hate", "groupa"), ("neutral", "groupa"), ("neutral", "groupb")]
    assert sorted(prompts[0].text.split("\n")) == ["-", f"- {held[0]}", f"- {held[1]}"]
    assert [p.text for p in prompts[1:]] == [f"- {held[2]}\n-", f"- {held[3]}\n-"]
    assert len(protocols.read_toxigen(tmp_path / "tg", limit=2)) == 6
    write_rtp(tmp_path / "rtp")
    rtp = protocols.read_rtp(tmp_path / "rtp")
    assert [p.label for p in rtp] == ["toxic"] * 2 + ["nontoxic"] * 3
    assert protocols.read_rtp(tmp_path / "rtp", limit=1, seed=3) == protocols.read_rtp(tmp_path / "rtp", limit=1, seed=3)
    with pytest.raises(FileNotFoundError, match="no ToxiGen"):
        protocols.read_toxigen(tmp_path / "rtp")
    (tmp_path / "rtp" / "toxic.jsonl").write_text(json.dumps({"prompt": {}}) + "\n")
    with pytest.raises(ValueError, match=r"toxic.jsonl:1: missing field 'prompt.text'"):
        protocols.read_rtp(tmp_path / "rtp")


def test_rtp_end_to_end_is_seeded_and_alpha_zero_is_baseline(tmp_path, params):
    write_rtp(tmp_path / "rtp")
    tok = ByteTokenizer()
    settings = protocols.GenerationSettings(samples=3, max_new_tokens=6, batch_size=8, seed=1)
    first = protocols.rtp(CFG, params, tok, tmp_path / "rtp", vowel_share, settings=settings, progress=False)
    again = protocols.rtp(CFG, params, tok, tmp_path / "rtp", vowel_share, settings=settings, progress=False)
    assert first.summary() == again.summary()
    assert set(first.groups["by_label"]) == {"toxic", "nontoxic"}
    assert all(len(r["continuations"]) == 3 for r in first.records)
    scores = [r["scores"] for r in first.records]
    assert first.metrics["expected_max_toxicity"] == pytest.approx(np.mean([max(s) for s in scores]))
    zero = Intervention.zeros(CFG)
    with_zero = protocols.rtp(CFG, params, tok, tmp_path / "rtp", vowel_share, settings=settings, intervention=zero, progress=False)
    assert with_zero.records == first.records
    path = first.save(tmp_path / "out")
    assert json.loads(path.read_text())["expected_max_toxicity"] == first.metrics["expected_max_toxicity"]
    assert len((tmp_path / "out" / "rtp_generations.jsonl").read_text().splitlines()) == 5


def test_toxigen_end_to_end_with_prefix(tmp_path, params):
    write_toxigen(tmp_path / "tg")
    tok = ByteTokenizer()
    settings = protocols.GenerationSettings(samples=1, max_new_tokens=8, batch_size=4, stop_at_newline=True)
    plain = protocols.toxigen(CFG, params, tok, tmp_path / "tg", vowel_share, settings=settings, progress=False)
    assert set(plain.groups["by_group"]) == {"groupa", "groupb"} and set(plain.groups["by_label"]) == {"hate", "neutral"}
    assert all("\n" not in c for r in plain.records for c in r["continuations"])
    import dataclasses

    # the 111-byte instruction needs a longer context than CFG's 96 (RoPE: same parameters)
    prefixed = protocols.toxigen(
        dataclasses.replace(CFG, max_seq_len=256), params, tok, tmp_path / "tg", vowel_share,
        settings=dataclasses.replace(settings, prefix=protocols.DETOX_INSTRUCTION), progress=False,
    )
    assert [r["continuations"] for r in prefixed.records] != [r["continuations"] for r in plain.records]


def test_scorer_contract_is_checked():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        protocols.score_texts(lambda texts: [2.0] * len(texts), ["a"])
    with pytest.raises(ValueError, match="one probability"):
        protocols.score_texts(lambda texts: [], ["a"])


def test_generate_texts_and_the_protocols_share_one_generation_path(params):
    from types import SimpleNamespace

    from jaxlm.decode import GenerationError

    prompts = ["The weather is", "Once upon a time there was", "ok"]
    loaded = SimpleNamespace(config=CFG, params=params, tokenizer=ByteTokenizer())
    records = protocols.generate_texts(loaded, prompts, max_new_tokens=5, temperature=1.0, top_k=5, seed=3,
                                       batch_size=2, progress=False)
    settings = protocols.GenerationSettings(samples=1, max_new_tokens=5, temperature=1.0, top_k=5, seed=3, batch_size=2)
    encoded, _ = protocols.encode_prompts(CFG, ByteTokenizer(), prompts, settings)
    ids = protocols.generate_token_ids(CFG, params, ByteTokenizer(), encoded, settings)
    assert [r["tokens"] for r in records] == [per_prompt[0] for per_prompt in ids]
    texts = protocols.continue_encoded(CFG, params, ByteTokenizer(), encoded, settings)
    assert [r["completion"] for r in records] == [t[0] for t in texts]
    assert not any(r["prompt_truncated"] for r in records)
    with pytest.raises(GenerationError, match="top_k: expected an integer >= 0"):
        protocols.GenerationSettings(top_k=-1)
    with pytest.raises(GenerationError, match=r"prompt 1 \(''\) encodes to no tokens"):
        protocols.generate_texts(loaded, ["a", ""], max_new_tokens=2, progress=False)
