import gzip
import json

import jax
import numpy as np
import pytest

from jaxlm import model
from jaxlm.config import model_preset
from jaxlm.evaluate import capability
from jaxlm.intervene import Intervention

CFG = model_preset("tiny")


class ByteTokenizer:
    """Bytes as tokens (ids 2..257 clipped into the tiny vocab); eos 0, pad 1."""

    eos_id, pad_id = 0, 1

    def encode_batch(self, texts):
        return [[2 + (b % (CFG.vocab_size - 2)) for b in t.encode()] for t in texts]


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, 0)


def manual_logprobs(params, row, intervention=None):
    tokens = np.asarray([row])
    head = intervention.as_head_intervention(np.ones_like(tokens, bool)) if intervention is not None else None
    logits = model.forward(CFG, params, tokens, intervention=head).logits[0, :-1]
    logp = jax.nn.log_softmax(logits, -1)
    return np.asarray(logp[np.arange(len(row) - 1), row[1:]])


def test_score_rows_matches_unpadded_forward(params):
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 17, 9, 40, 2)]
    logps, _ = capability.score_rows(CFG, params, rows, batch_size=2, bucket=16)
    for row, lp in zip(rows, logps):
        np.testing.assert_allclose(lp, manual_logprobs(params, row), atol=1e-5)


def test_text_loss_and_kl(params):
    tok = ByteTokenizer()
    docs = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen liquor jugs"]
    base = capability.text_loss(CFG, params, tok, docs, max_len=32, batch_size=4, ref_params=params, progress=None)
    assert base.kl == pytest.approx(0.0, abs=1e-6)
    assert base.perplexity == pytest.approx(np.exp(base.ce))
    rows = capability.window_rows(tok.encode_batch(docs), 32, tok.eos_id)
    assert base.n_tokens == sum(len(r) - 1 for r in rows)
    expected = -np.mean(np.concatenate([manual_logprobs(params, r) for r in rows]))
    assert base.ce == pytest.approx(expected, abs=1e-5)

    rng = np.random.default_rng(1)
    directions = rng.normal(size=(CFG.n_layers, CFG.n_heads, CFG.resolved_head_dim))
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    iti = Intervention.create(directions, np.ones((CFG.n_layers, CFG.n_heads)), np.ones((CFG.n_layers, CFG.n_heads)), 0.0, "all")
    zero = capability.text_loss(CFG, params, tok, docs, max_len=32, batch_size=4, intervention=iti, ref_params=params, progress=None)
    assert zero.ce == base.ce and zero.kl == pytest.approx(0.0, abs=1e-6)
    strong = capability.text_loss(
        CFG, params, tok, docs, max_len=32, batch_size=4, intervention=iti.with_alpha(5.0), ref_params=params, progress=None
    )
    assert strong.kl > 1e-3 and strong.ce != base.ce
    row = rows[0]
    np.testing.assert_allclose(
        capability.score_rows(CFG, params, [row], batch_size=1, intervention=iti.with_alpha(5.0))[0][0],
        manual_logprobs(params, row, iti.with_alpha(5.0)),
        atol=1e-5,
    )


def test_window_rows_prepends_context_token():
    rows = capability.window_rows([[5, 6, 7, 8, 9]], 3, bos_id=0)
    assert rows == [[0, 5, 6], [0, 7, 8], [0, 9]]
    assert capability.window_rows([[5, 6, 7, 8, 9]], 3, bos_id=0, max_rows=2) == [[0, 5, 6], [0, 7, 8]]


def test_read_documents_wikitext_and_paragraphs(tmp_path):
    wiki = tmp_path / "w.txt"
    wiki.write_text(" = Alpha = \n\n A 3 @-@ 4 result , fine . \n\n = = Sub = = \n\n more text \n\n = Beta = \n\n second article \n")
    docs = capability.read_documents(wiki)
    assert len(docs) == 2 and "3-4 result, fine." in docs[0] and "Sub" in docs[0] and docs[1].startswith("= Beta =")
    plain = tmp_path / "p.txt.gz"
    plain.write_bytes(gzip.compress(b"first para\nline two\n\n\nsecond para\n"))
    assert capability.read_documents(plain) == ["first para\nline two", "second para"]


def test_blimp_reader_and_accuracy(tmp_path, params):
    rows = [{"sentence_good": "a b c", "sentence_bad": "c b a", "field": "syntax", "UID": "p1"}] * 3
    (tmp_path / "p1.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p2.jsonl.gz").write_bytes(gzip.compress(json.dumps({"sentence_good": "x y", "sentence_bad": "y y", "field": "morphology"}).encode()))
    pairs = capability.read_blimp(tmp_path)
    assert [p.paradigm for p in pairs] == ["p1", "p1", "p1", "p2"]
    tok = ByteTokenizer()
    result = capability.blimp_accuracy(CFG, params, tok, pairs, batch_size=4, progress=None)

    def total(text):
        return manual_logprobs(params, [tok.eos_id] + tok.encode_batch([text])[0]).sum()

    expected = [total(p.good) > total(p.bad) for p in pairs]
    assert result["blimp_accuracy"] == pytest.approx(np.mean(expected))
    assert set(result["per_paradigm"]) == {"p1", "p2"} and set(result["per_field"]) == {"syntax", "morphology"}


def test_blimp_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no BLiMP"):
        capability.read_blimp(tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"sentence_good": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: missing field 'sentence_bad'"):
        capability.read_blimp(tmp_path)
    with pytest.raises(FileNotFoundError, match="paradigm"):
        capability.read_blimp(tmp_path, paradigms=["nope"])


def test_real_wikitext_and_blimp_parse(shared_dataset):
    docs = capability.read_documents(shared_dataset("eval/wikitext2/valid.txt"))
    assert len(docs) > 50 and not any(" @-@ " in d for d in docs)
    pairs = capability.read_blimp(shared_dataset("eval/blimp"), limit_per_paradigm=2)
    assert len({p.paradigm for p in pairs}) == 67 and len(pairs) == 134


def test_alpha_for_kl_inverts_a_measured_curve():
    from jaxlm.evaluate.capability import ALPHA_GRID, alpha_for_kl

    alphas = np.asarray(ALPHA_GRID)
    kls = 0.01 * alphas**2  # a small shift of the logits: KL grows quadratically
    for target in (1e-4, 0.03, 0.2, 5.0):
        assert alpha_for_kl(alphas, kls, target) == pytest.approx(np.sqrt(target / 0.01), rel=1e-9)
    assert alpha_for_kl(alphas, kls, 1e6) == alphas[-1]  # beyond the grid: the strongest
    noisy = kls.copy()
    noisy[5] = noisy[4] * 0.5  # a non-monotone measurement never yields a weaker alpha for a larger budget
    found = [alpha_for_kl(alphas, noisy, t) for t in np.geomspace(1e-3, 10, 30)]
    assert np.all(np.diff(found) >= 0)
    with pytest.raises(ValueError, match="positive"):
        alpha_for_kl(alphas, kls, 0.0)


def test_calibrated_alpha_hits_its_kl_budget(params):
    from jaxlm.evaluate.capability import ALPHA_GRID, alpha_for_kl, kl_curve, text_loss

    config, tokenizer = CFG, ByteTokenizer()
    shape = (config.n_layers, config.n_heads)
    directions = np.random.default_rng(0).normal(size=(*shape, config.resolved_head_dim)).astype(np.float32)
    intervention = Intervention.create(directions, np.ones(shape), np.ones(shape), 0.0, "last")
    docs = ["the river ran past old stone houses while children read books " * n for n in (1, 3, 2, 1, 4)]
    kls = kl_curve(config, params, tokenizer, docs, intervention, max_len=32, max_rows=9, batch_size=4)
    assert kls[0] >= 0 and kls[-1] > kls[0]
    for i in (0, 8, 16):  # one program for every alpha measures what text_loss measures at that alpha
        kl = text_loss(config, params, tokenizer, docs, max_len=32, max_rows=9, ref_params=params, batch_size=4,
                       intervention=intervention.with_mode("all").with_alpha(ALPHA_GRID[i]), progress=None).kl
        np.testing.assert_allclose(kls[i], kl, rtol=1e-4, atol=1e-7)
    docs = ["the river ran past old stone houses while children read books"] * 8
    kls = kl_curve(config, params, tokenizer, docs, intervention, max_len=32, max_rows=8)
    alpha = alpha_for_kl(ALPHA_GRID, kls, float(np.sqrt(kls[3] * kls[4])))
    kl = text_loss(config, params, tokenizer, docs, max_len=32, max_rows=8, ref_params=params,
                   intervention=intervention.with_mode("all").with_alpha(alpha), progress=None).kl
    assert kls[3] <= kl <= kls[4]


def test_prepared_document_losses_equal_text_loss_document_by_document(tmp_path, params):
    from jaxlm.data import records

    tok = ByteTokenizer()
    docs = ["the quick brown fox jumps over the lazy dog " * 4, "pack my box", "with five dozen liquor jugs " * 2]
    ids = tok.encode_batch(docs)
    rows = [(np.asarray(i), {"doc_id": f"d{n}", "source": "src", "score": n}) for n, i in enumerate(ids)]
    made = records.write_source(tmp_path / "src", rows)
    entry = {"directory": "src", "token_dtype": "uint16", "vocab_size": CFG.vocab_size, "eos_id": 0, "pad_id": 1, **made}
    records.write_manifest(tmp_path, {"src": entry})
    losses = capability.prepared_document_losses(CFG, params, tmp_path / "src", max_len=32, batch_size=2, progress=None)
    assert [m["score"] for m in losses.meta] == [0, 1, 2]
    for n, doc in enumerate(docs):
        alone = capability.text_loss(CFG, params, tok, [doc], max_len=32, progress=None)
        assert losses.tokens[n] == alone.n_tokens
        assert losses.nll[n] / losses.tokens[n] == pytest.approx(alone.ce, abs=1e-5)
    everything = capability.text_loss(CFG, params, tok, docs, max_len=32, progress=None)
    assert losses.ce() == pytest.approx(everything.ce, abs=1e-5)
    assert losses.ce(np.asarray([False, True, False])) == pytest.approx(losses.nll[1] / losses.tokens[1])
    first = capability.prepared_document_losses(CFG, params, tmp_path / "src", max_documents=1, max_len=32, progress=None)
    assert len(first.meta) == 1 and first.nll[0] == pytest.approx(losses.nll[0], rel=1e-6)
