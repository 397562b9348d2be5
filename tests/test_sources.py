"""Corpus readers: formats, HTML cleaning, Gutenberg boilerplate, counted drops, bad input, TFDS, real data."""

import csv
import gzip
import io
import itertools
import json
import re

import pytest

from jaxlm.config import ConfigError
from jaxlm.data import DataError
from jaxlm.data.sources import (
    Document,
    ReadOptions,
    ReadStats,
    clean_4chan_html,
    open_binary,
    read_4chan_csv,
    read_4chan_ndjson,
    read_csv,
    read_gutenberg,
    read_jsonl,
    read_text,
    read_text_files,
    read_tfds,
    read_wikitext,
    split_text,
    strip_gutenberg_boilerplate,
)

POL_HEADER = ["", "name", "comment", "time", "country", "thread", "subject", "threadtime"]


def write(path, data: str | bytes, compress: bool = False):
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def csv_text(rows, header=POL_HEADER) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def post(no, comment, time, thread, subject="", country="US"):
    return [no, "Anonymous", comment, time, country, thread, subject, "2026-01-01 00:00:00"]


# ---------------------------------------------------------------------------------------
# 4chan HTML cleaning
# ---------------------------------------------------------------------------------------

QUOTELINK = '<a href="#p100" class="quotelink">&gt;&gt;100</a>'


@pytest.mark.parametrize(
    "markup, expected",
    [
        ("first line<br>second line", "first line\nsecond line"),
        ("para<br><br>next para<br><br><br><br>third", "para\n\nnext para\n\nthird"),
        ("Don&#039;t say &quot;x&quot; &amp; 5 &lt; 6 &gt; 4", "Don't say \"x\" & 5 < 6 > 4"),
        ('<span class="quote">&gt;be me</span><br>post text', ">be me\npost text"),
        ('text before<span class="quote">&gt;quote</span>', "text before\n>quote"),
        (QUOTELINK + "<br>I agree", "I agree"),
        (QUOTELINK + "<br>" + QUOTELINK.replace("100", "101") + "<br>both wrong", "both wrong"),
        ('see <a href="//boards.4chan.org/sci/thread/5#p6" class="quotelink">&gt;&gt;&gt;/sci/6</a> there', "see there"),
        ('<span class="deadlink">&gt;&gt;999</span><br>gone', "gone"),
        ("plain &gt;&gt;12345 and &gt;&gt;&gt;/pol/ refs", "plain and refs"),
        ("http://example.com/long-<wbr>url-here", "http://example.com/long-url-here"),
        ("<b>bold</b> <s>spoiler</s> <u>under</u> <i>it</i>", "bold spoiler under it"),
        ('<p style="x">block one</p>\n<p>block two</p>', "block one\n\nblock two"),
        ("  lots   of \t space  <br>   here  ", "lots of space\nhere"),
        ("raw\nnewline is html whitespace", "raw newline is html whitespace"),
        ("emoji 🙂 and 日本語 &#128512;", "emoji 🙂 and 日本語 😀"),
        ('<span class="quote">&gt;&gt;implying</span>', ">>implying"),
        (QUOTELINK, ""),
        ("<br><br>  <wbr>", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_clean_4chan_html(markup, expected):
    assert clean_4chan_html(markup) == expected


# ---------------------------------------------------------------------------------------
# 4chan readers
# ---------------------------------------------------------------------------------------


@pytest.fixture
def pol_files(tmp_path):
    day1 = [
        post(10, "Opening post<br>with text", "2026-01-01 10:00:00", 10, subject="Thread &amp; title"),
        post(12, QUOTELINK.replace("100", "10") + "<br>late reply", "2026-01-01 10:05:00", 10),
        post(11, '<span class="quote">&gt;early</span><br>reply', "2026-01-01 10:01:00", 10),
        post(13, "", "2026-01-01 10:06:00", 10),  # image-only post
        post(20, "other thread", "2026-01-01 11:00:00", 20),
    ]
    day2 = [
        post(10, "Opening post<br>with text", "2026-01-01 10:00:00", 10, subject="Thread &amp; title"),  # sticky again
        post(14, "next day reply", "2026-01-02 09:00:00", 10),
        post(30, QUOTELINK, "2026-01-02 09:30:00", 30),  # nothing left after cleaning
    ]
    # gzip data under a .csv name: detected by magic bytes, not the extension
    first = write(tmp_path / "pol" / "day1.csv", csv_text(day1), compress=True)
    second = write(tmp_path / "pol" / "day2.csv.gz", csv_text(day2), compress=True)
    return first, second


def test_read_4chan_csv_posts(pol_files):
    stats = ReadStats()
    docs = list(read_4chan_csv(sorted(pol_files), stats=stats))
    assert [d.doc_id for d in docs] == ["10", "12", "11", "20", "14"]
    assert all(isinstance(d, Document) and d.source == "pol" for d in docs)
    assert docs[0].text == "Thread & title\nOpening post\nwith text"  # subject opens the OP
    assert docs[1].text == "late reply"
    assert docs[2].text == ">early\nreply"
    assert docs[1].meta == {"thread": 10, "time": "2026-01-01 10:05:00", "country": "US"}
    assert stats.dropped("pol") == {"duplicate_id": 1, "empty": 2}
    assert stats.to_dict()["pol"]["documents"] == 5
    assert stats.to_dict()["pol"]["characters"] == sum(len(d.text) for d in docs)
    no_subject = next(read_4chan_csv(pol_files[0], include_subject=False))
    assert no_subject.text == "Opening post\nwith text"


def test_read_4chan_csv_threads(pol_files):
    stats = ReadStats()
    docs = {d.doc_id: d for d in read_4chan_csv(sorted(pol_files), documents="threads", stats=stats)}
    assert sorted(docs) == ["10", "20"]
    # Posts in time order across both files, the duplicate sticky once, empty posts left out.
    assert docs["10"].text == "Thread & title\nOpening post\nwith text\n\n>early\nreply\n\nlate reply\n\nnext day reply"
    assert docs["10"].meta == {"posts": 4, "time": "2026-01-01 10:00:00", "subject": "Thread & title"}
    assert stats.dropped("pol") == {"duplicate_id": 1, "empty": 1, "empty_post": 2}


def ndjson_thread(op_no, posts):
    return json.dumps({"posts": posts}) + "\n"


def test_read_4chan_ndjson(tmp_path):
    lines = ndjson_thread(
        1,
        [
            {"no": 1, "resto": 0, "time": 1000, "sub": "Sub &gt; ject", "com": "OP<br>text", "country": "DE",
             "perspectives": {"TOXICITY": 0.1, "SEVERE_TOXICITY": 0.01}},
            {"no": 3, "resto": 1, "time": 1003, "com": "later", "perspectives": {"TOXICITY": 0.9}},
            {"no": 2, "resto": 1, "time": 1001, "com": '<a href="#p1" class="quotelink">&gt;&gt;1</a><br>earlier'},
            {"no": 4, "resto": 1, "time": 1004},  # image-only: no "com"
        ],
    ) + "\n" + ndjson_thread(5, [{"no": 5, "resto": 0, "time": 2000, "com": "second &amp; thread"}])
    path = write(tmp_path / "pol.ndjson.gz", lines, compress=True)
    stats = ReadStats()
    posts = list(read_4chan_ndjson(path, source="kek", stats=stats))
    assert [p.doc_id for p in posts] == ["1", "3", "2", "5"]
    assert posts[0].text == "Sub > ject\nOP\ntext"
    assert posts[0].meta == {"thread": 1, "time": 1000, "country": "DE",
                             "perspectives": {"TOXICITY": 0.1, "SEVERE_TOXICITY": 0.01}}
    assert posts[1].meta["perspectives"] == {"TOXICITY": 0.9} and posts[2].text == "earlier"
    assert stats.dropped("kek") == {"empty": 1}
    threads = list(read_4chan_ndjson(path, documents="threads"))
    assert [t.doc_id for t in threads] == ["1", "5"]
    assert threads[0].text == "Sub > ject\nOP\ntext\n\nearlier\n\nlater"


def test_4chan_bad_input(tmp_path):
    missing_column = write(tmp_path / "a.csv", csv_text([[1, "x"]], header=["", "comment"]))
    with pytest.raises(DataError, match=r"a\.csv:1: missing column\(s\) \['time', 'thread'\].*columns: \['', 'comment'\]"):
        list(read_4chan_csv(missing_column))
    bad_number = write(tmp_path / "b.csv", csv_text([post("abc", "x", "t", 1)]))
    with pytest.raises(DataError, match=r"b\.csv:2: .*post number.*'abc'"):
        list(read_4chan_csv(bad_number))
    no_posts = write(tmp_path / "c.ndjson", '{"threads": []}\n')
    with pytest.raises(DataError, match=r"c\.ndjson:1: expected a thread object with a non-empty 'posts' list \(got \['threads'\]\)"):
        list(read_4chan_ndjson(no_posts))
    no_number = write(tmp_path / "d.ndjson", '{"posts": [{"com": "x", "time": 1}]}\n')
    with pytest.raises(DataError, match=r"d\.ndjson:1: field 'no' missing .*\['com', 'time'\]"):
        list(read_4chan_ndjson(no_number))
    with pytest.raises(ConfigError, match="documents"):
        list(read_4chan_csv(missing_column, documents="pages"))
    only_empty = write(tmp_path / "e.csv", csv_text([post(1, "", "t", 1), post(2, QUOTELINK, "t", 1)]))
    with pytest.raises(DataError, match=r"e\.csv: no documents .*empty corpus.*'empty': 2"):
        list(read_4chan_csv(only_empty))


# ---------------------------------------------------------------------------------------
# Generic readers
# ---------------------------------------------------------------------------------------


def test_read_wikitext_yields_one_detokenized_document_per_article(tmp_path):
    wiki = write(tmp_path / "wiki" / "valid.txt",
                 " \n = Alpha = \n\n A 3 @-@ 4 result , fine . \n\n = = Sub = = \n\n more \n\n = Beta = \n\n second \n",
                 compress=True)
    stats = ReadStats()
    docs = list(read_wikitext(wiki, "wiki", options=ReadOptions(max_chars=1000), stats=stats))
    assert [d.doc_id for d in docs] == ["valid.txt:0", "valid.txt:1"]
    assert docs[0].text.startswith("= Alpha =") and "3-4 result, fine." in docs[0].text and "= = Sub = =" in docs[0].text
    assert docs[1].text == "= Beta = \n\n second" and docs[1].meta == {"path": "valid.txt", "article": 1}
    assert stats.to_dict()["wiki"]["documents"] == 2
    plain = write(tmp_path / "plain.txt", "no headings here\n")
    with pytest.raises(DataError, match="plain.txt: not in the WikiText format"):
        list(read_wikitext(plain, "wiki"))


def test_read_text_files_glob_dir_and_gzip_by_magic(tmp_path):
    write(tmp_path / "docs" / "a.txt", "alpha\r\n\ttabbed 🙂\n")
    write(tmp_path / "docs" / "sub" / "b.txt", "beta", compress=True)  # gzip without .gz suffix
    write(tmp_path / "docs" / "c.txt.gz", "plain bytes under a .gz name")  # not gzip: read as is
    write(tmp_path / "docs" / "empty.txt", " \n\n")
    write(tmp_path / "docs" / ".hidden", "skip me")
    stats = ReadStats()
    docs = list(read_text_files(tmp_path / "docs", "files", stats=stats))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.txt", "alpha\r\n\ttabbed 🙂\n"),
        ("c.txt.gz", "plain bytes under a .gz name"),
        ("sub/b.txt", "beta"),
    ]
    assert stats.dropped("files") == {"empty": 1}
    globbed = list(read_text_files(str(tmp_path / "docs" / "**" / "*.txt"), "files"))
    assert [d.doc_id for d in globbed] == ["a.txt", "sub/b.txt"]  # empty.txt dropped
    single = tmp_path / "docs" / "a.txt"
    assert [d.doc_id for d in read_text_files([single], "files")] == ["a.txt"]
    other = write(tmp_path / "other" / "a.txt", "same name")
    assert [d.doc_id for d in read_text_files([single, other], "files")] == [str(single), str(other)]
    assert read_text(tmp_path / "docs" / "sub" / "b.txt") == "beta"


def test_read_jsonl_dotted_fields_and_errors(tmp_path):
    records = [
        {"prompt": {"text": "first prompt"}, "id": "a"},
        {"prompt": {"text": ""}, "id": "b"},
        {"prompt": {"text": None}, "id": "c"},
        {"prompt": {"text": "dup"}, "id": "a"},
        {"prompt": {"text": "last"}, "id": 7},
    ]
    path = write(tmp_path / "rtp.jsonl.gz", "\n".join(json.dumps(r) for r in records) + "\n\n", compress=True)
    stats = ReadStats()
    docs = list(read_jsonl(path, "prompt.text", "rtp", id_field="id", stats=stats))
    assert [(d.doc_id, d.text) for d in docs] == [("a", "first prompt"), ("7", "last")]
    assert docs[1].meta == {"file": "rtp.jsonl.gz", "line": 5}
    assert stats.dropped("rtp") == {"duplicate_id": 1, "empty": 2}
    by_line = list(read_jsonl(path, "prompt.text", "rtp"))
    assert [d.doc_id for d in by_line] == ["rtp.jsonl.gz:1", "rtp.jsonl.gz:4", "rtp.jsonl.gz:5"]

    with pytest.raises(DataError, match=r"rtp\.jsonl\.gz:1: field 'prompt\.body' missing \(available at prompt: \['text'\]\)"):
        list(read_jsonl(path, "prompt.body", "rtp"))
    with pytest.raises(DataError, match=r"rtp\.jsonl\.gz:1: field 'txt' missing \(available at top level: \['id', 'prompt'\]\)"):
        list(read_jsonl(path, "txt", "rtp"))
    numbers = write(tmp_path / "n.jsonl", '{"text": 5}\n')
    with pytest.raises(DataError, match=r"n\.jsonl:1: field 'text' must be a string, got int"):
        list(read_jsonl(numbers, "text", "x"))
    broken = write(tmp_path / "broken.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        list(read_jsonl(broken, "text", "x"))


def test_read_csv_large_multiline_fields(tmp_path):
    huge = "word " * 60_000  # 300k characters: above csv's default 131072 field limit
    rows = [["1", "multi\nline\ntext", "x"], ["2", huge, "y"], ["3", "", "z"]]
    path = write(tmp_path / "t.csv", csv_text(rows, header=["id", "body", "other"]))
    stats = ReadStats()
    docs = list(read_csv(path, "body", "c", id_column="id", stats=stats))
    assert [(d.doc_id, len(d.text)) for d in docs] == [("1", 15), ("2", len(huge))]
    assert docs[0].text == "multi\nline\ntext"
    assert stats.dropped("c") == {"empty": 1}
    no_ids = list(read_csv(path, "body", "c"))
    assert [d.doc_id for d in no_ids] == ["t.csv:2", "t.csv:5"]  # the first record spans lines 2-4
    with pytest.raises(DataError, match=r"t\.csv:1: missing column\(s\) \['text'\] \(columns: \['id', 'body', 'other'\]\)"):
        list(read_csv(path, "text", "c"))
    short = write(tmp_path / "short.csv", "a,b\n1\n")
    with pytest.raises(DataError, match=r"short\.csv:2: row has 1 fields, the header has 2"):
        list(read_csv(short, "b", "c"))
    empty = write(tmp_path / "empty.csv", "")
    with pytest.raises(DataError, match=r"empty\.csv: empty CSV file"):
        list(read_csv(empty, "b", "c"))


# ---------------------------------------------------------------------------------------
# Gutenberg
# ---------------------------------------------------------------------------------------

MODERN_BOOK = (
    "The Project Gutenberg EBook of A Tale, by Some Author\r\n\r\n"
    "This eBook is for the use of anyone anywhere at no cost.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK A TALE OF TWO\r\nVOLUMES ***\r\n\r\n\r\n"
    "Produced by A. Volunteer and the Online Distributed\r\nProofreading Team\r\n\r\n\r\n"
    "CHAPTER I\r\n\r\nIt was a dark night.\r\n\r\n" + "The story goes on.\r\n" * 30 + "\r\n"
    "End of the Project Gutenberg EBook of A Tale, by Some Author\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK A TALE ***\r\n\r\nLicence text follows.\r\n"
)
OLD_BOOK = (
    "**The Project Gutenberg Etext of Old Times**\n\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
    "OLD TIMES\n\nOnce upon a time.\n" + "More text.\n" * 30 + "\nEnd of Project Gutenberg's Old Times, by Anon\n"
)


def test_strip_gutenberg_boilerplate():
    body, removed = strip_gutenberg_boilerplate(MODERN_BOOK)
    assert removed == ("header", "credits", "footer")
    assert body.startswith("CHAPTER I\n\nIt was a dark night.") and body.endswith("The story goes on.")
    assert "\r" not in body and "Gutenberg" not in body and "VOLUMES" not in body
    body, removed = strip_gutenberg_boilerplate(OLD_BOOK)
    assert removed == ("header", "footer")
    assert body.startswith("OLD TIMES\n\nOnce upon a time.") and body.endswith("More text.")
    # An already clean text keeps its content; mid-book "END OF THE" lines are not footers.
    clean = "THE ILIAD\n\nSing, goddess.\n\nEND OF THE ILIAD.\n\nAppendix."
    assert strip_gutenberg_boilerplate(clean) == (clean, ())
    # The wrapped tail of a START marker left by an earlier stripping pass is front matter.
    assert strip_gutenberg_boilerplate("3) ***\n\n\nBOOK ONE\n\nText.")[0] == "BOOK ONE\n\nText."


def test_read_gutenberg(tmp_path):
    root = tmp_path / "gutenberg"
    write(root / "Author, Some" / "A Tale.txt.gz", MODERN_BOOK, compress=True)
    write(root / "Anon" / "Old Times.txt", OLD_BOOK)
    write(root / "Anon" / "notes.md", "not a book")
    stats = ReadStats()
    books = list(read_gutenberg(root, stats=stats))
    assert [b.doc_id for b in books] == ["Anon/Old Times", "Author, Some/A Tale"]
    assert books[1].meta == {"author": "Author, Some", "title": "A Tale", "boilerplate": ["header", "credits", "footer"]}
    assert books[1].source == "gutenberg" and books[1].text.startswith("CHAPTER I")
    assert stats.to_dict() == {
        "gutenberg": {"documents": 2, "characters": sum(len(b.text) for b in books), "split": 0, "dropped": {}}
    }


# ---------------------------------------------------------------------------------------
# Bad input and document policy
# ---------------------------------------------------------------------------------------


def test_missing_and_unreadable_paths(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        list(read_jsonl(missing, "text", "x"))
    with pytest.raises(DataError, match=r"no files match this pattern"):
        list(read_text_files(str(tmp_path / "*.txt"), "x"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=r"emptydir: directory has no files ending in \.txt, \.txt\.gz"):
        list(read_gutenberg(tmp_path / "emptydir"))
    with pytest.raises(DataError, match=r"emptydir: cannot open for reading"):
        with open_binary(tmp_path / "emptydir"):
            pass


def test_unreadable_file(tmp_path):
    locked = write(tmp_path / "locked.txt", "secret")
    locked.chmod(0)
    try:
        try:
            locked.open("rb").close()
            pytest.skip("running with permission to read any file (root)")
        except PermissionError:
            pass
        with pytest.raises(DataError, match=r"locked\.txt: cannot open for reading \(Permission denied\)"):
            list(read_text_files(locked, "x"))
    finally:
        locked.chmod(0o644)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(("line of text\n" * 5000).encode())
    truncated = write(tmp_path / "truncated.txt.gz", good[: len(good) // 2])
    with pytest.raises(DataError, match=r"truncated\.txt\.gz: corrupt or truncated gzip"):
        list(read_text_files(truncated, "x"))
    garbage = write(tmp_path / "garbage.jsonl.gz", b"\x1f\x8b" + b"\x00not really gzip" * 10)
    with pytest.raises(DataError, match=r"garbage\.jsonl\.gz: corrupt or truncated gzip"):
        list(read_jsonl(garbage, "text", "x"))
    with pytest.raises(DataError, match="truncated.txt.gz"):
        with open_binary(truncated) as stream:
            stream.read()


def test_invalid_utf8_error_names_line_and_offset_or_counts_a_drop(tmp_path):
    lines = b'{"text": "ok"}\n{"text": "bad \xff byte"}\n{"text": "fine"}\n'
    path = write(tmp_path / "u.jsonl.gz", lines, compress=True)
    offset = lines.index(b"\xff")
    with pytest.raises(DataError, match=rf"u\.jsonl\.gz: invalid UTF-8 at line 2, byte offset {offset}"):
        list(read_jsonl(path, "text", "x"))
    stats = ReadStats()
    docs = list(read_jsonl(path, "text", "x", options=ReadOptions(invalid_utf8="drop"), stats=stats))
    assert [d.text for d in docs] == ["ok", "fine"] and stats.dropped("x") == {"invalid_utf8": 1}

    text_file = write(tmp_path / "t.txt", b"fine\nline two \xc3\x28 broken\n")
    with pytest.raises(DataError, match=r"t\.txt: invalid UTF-8 at line 2, byte offset 14"):
        list(read_text_files(text_file, "x"))
    with pytest.raises(DataError, match="t.txt"):
        read_text(text_file)

    csv_bytes = b'id,text\n1,"good"\n2,"multi\nline \xe9 latin-1"\n3,after\n'
    csv_path = write(tmp_path / "c.csv", csv_bytes)
    offset = csv_bytes.index(b"\xe9")
    with pytest.raises(DataError, match=rf"c\.csv: invalid UTF-8 at line 4, byte offset {offset}"):
        list(read_csv(csv_path, "text", "x"))
    stats = ReadStats()
    docs = list(read_csv(csv_path, "text", "x", id_column="id", options=ReadOptions(invalid_utf8="drop"), stats=stats))
    assert [d.doc_id for d in docs] == ["1", "3"] and stats.dropped("x") == {"invalid_utf8": 1}
    bom = write(tmp_path / "bom.csv", b"\xef\xbb\xbfid,text\n1,x\n")  # a UTF-8 byte-order mark is not data
    assert [d.doc_id for d in read_csv(bom, "text", "x", id_column="id")] == ["1"]


def test_empty_corpus_is_an_error(tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=r"empty\.jsonl: no documents for source 'x' \(empty corpus\)"):
        list(read_jsonl(empty, "text", "x"))
    blanks = write(tmp_path / "blanks.jsonl", '{"text": "  "}\n{"text": "\\n"}\n')
    with pytest.raises(DataError, match=r"empty corpus; dropped \{'empty': 2\}"):
        list(read_jsonl(blanks, "text", "x"))


def test_giant_documents_split_or_dropped(tmp_path):
    paragraphs = ["Paragraph %d. " % i + "word " * 30 + "\n\n" for i in range(20)]
    giant = "".join(paragraphs)
    path = write(tmp_path / "g.jsonl", json.dumps({"text": giant}) + "\n" + json.dumps({"text": "small"}) + "\n")
    stats = ReadStats()
    parts = list(read_jsonl(path, "text", "g", options=ReadOptions(max_chars=500), stats=stats))
    pieces = [p for p in parts if p.doc_id.startswith("g.jsonl:1#")]
    assert "".join(p.text for p in pieces) == giant
    assert all(len(p.text) <= 500 for p in pieces) and len(pieces) > 1
    assert all(p.text.endswith("\n\n") for p in pieces[:-1])  # cut at paragraph breaks
    assert [p.meta["part"] for p in pieces] == list(range(len(pieces)))
    assert {p.meta["parts"] for p in pieces} == {len(pieces)}
    assert stats.to_dict()["g"]["split"] == 1 and stats.to_dict()["g"]["documents"] == len(pieces) + 1
    stats = ReadStats()
    kept = list(read_jsonl(path, "text", "g", options=ReadOptions(max_chars=500, too_long="drop"), stats=stats))
    assert [d.text for d in kept] == ["small"] and stats.dropped("g") == {"too_long": 1}


def test_split_text_boundaries():
    assert split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # no separator: hard cuts
    assert split_text("aaa bbb ccc", 8) == ["aaa bbb ", "ccc"]
    assert split_text("one\ntwo three four", 10) == ["one\ntwo ", "three four"]
    assert split_text("short", 10) == ["short"]


@pytest.mark.parametrize(
    "changes, field",
    [({"max_chars": 0}, "max_chars"), ({"too_long": "truncate"}, "too_long"), ({"invalid_utf8": "ignore"}, "invalid_utf8")],
)
def test_read_options_validation(changes, field):
    with pytest.raises(ConfigError, match=field):
        ReadOptions(**changes)


def test_drop_summary_is_logged_without_stats(tmp_path, caplog):
    path = write(tmp_path / "d.jsonl", '{"text": ""}\n{"text": "kept"}\n')
    with caplog.at_level("WARNING", logger="jaxlm.data.sources"):
        assert [d.text for d in read_jsonl(path, "text", "d")] == ["kept"]
    assert "dropped {'empty': 1}" in caplog.text


# ---------------------------------------------------------------------------------------
# TFDS (a tiny ArrayRecord dataset built here, no TensorFlow)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    import numpy as np
    from tensorflow_datasets.core import registered

    texts = {"train": ["first 🙂 doc", "", "third\ndoc", "fourth"], "test": ["only test doc"]}

    with registered.skip_registration():

        class JaxlmTinyText(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "url": tfds.features.Text(), "n": np.int64})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(split) for split in texts}

            def _generate_examples(self, split):
                for i, text in enumerate(texts[split]):
                    yield i, {"text": text, "url": f"http://x/{split}/{i}", "n": i}

    data_dir = tmp_path_factory.mktemp("tfds")
    JaxlmTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir, texts


def test_read_tfds(tfds_dir):
    data_dir, texts = tfds_dir
    stats = ReadStats()
    docs = list(read_tfds("jaxlm_tiny_text", "train", data_dir=data_dir, source="tiny", stats=stats, chunk=3))
    assert sorted(d.text for d in docs) == sorted(t for t in texts["train"] if t)
    assert {d.source for d in docs} == {"tiny"} and stats.dropped("tiny") == {"empty": 1}
    assert len({d.doc_id for d in docs}) == 3 and all(d.doc_id.startswith("train:") for d in docs)
    by_url = list(read_tfds("jaxlm_tiny_text", "test", data_dir=data_dir, id_key="url"))
    assert [(d.doc_id, d.text, d.source) for d in by_url] == [("http://x/test/0", "only test doc", "jaxlm_tiny_text")]


def test_read_tfds_errors(tfds_dir):
    data_dir, _ = tfds_dir
    with pytest.raises(DataError, match=r"no feature 'body' \(features: \['n', 'text', 'url'\]\)"):
        list(read_tfds("jaxlm_tiny_text", "train", text_key="body", data_dir=data_dir))
    with pytest.raises(DataError, match=r"TFDS dataset 'jaxlm_tiny_text' split 'validation'.*cannot open"):
        list(read_tfds("jaxlm_tiny_text", "validation", data_dir=data_dir))
    with pytest.raises(DataError, match=r"TFDS dataset 'jaxlm_no_such_set'"):
        list(read_tfds("jaxlm_no_such_set", "train", data_dir=data_dir))


# ---------------------------------------------------------------------------------------
# Real corpora (through the data directory)
# ---------------------------------------------------------------------------------------

TAG = re.compile(r"<(?:a|span|br|wbr|p|s|b|u|i|pre)\b[^>]*>|</(?:a|span|p|s|b|u|i|pre)>", re.IGNORECASE)
ENTITY = re.compile(r"&(?:gt|lt|quot|amp|apos|#\d+|#x[0-9a-f]+);", re.IGNORECASE)


@pytest.mark.data
def test_real_pol_day_and_gutenberg_books(shared_dataset):
    day = shared_dataset("toxic/pol/pol_2026-03-01.csv.gz")
    stats = ReadStats()
    posts = list(itertools.islice(read_4chan_csv(day, stats=stats), 400))
    assert len(posts) == 400 and len({p.doc_id for p in posts}) == 400
    with open_binary(day) as stream:
        rows = list(itertools.islice(csv.DictReader(io.TextIOWrapper(stream, encoding="utf-8", newline="")), 2000))
    raw = {row[""]: row["comment"] for row in rows}
    for doc in posts:
        assert doc.text.strip() and not TAG.search(doc.text), doc.doc_id
        if ENTITY.search(doc.text):  # only where the poster typed an entity literally
            assert "&amp;" in raw[doc.doc_id], doc.doc_id
        assert not re.search(r"(?<!>)>>\d+", doc.text), doc.doc_id
    consumed = [row[""] for row in rows].index(posts[-1].doc_id) + 1
    counts = stats.to_dict()["pol"]
    assert counts["documents"] == 400 and counts["documents"] + sum(counts["dropped"].values()) == consumed
    assert set(counts["dropped"]) <= {"empty", "duplicate_id"}

    stats = ReadStats()
    books = list(itertools.islice(read_gutenberg(shared_dataset("clean/gutenberg"), stats=stats), 2))
    assert len(books) == 2 and len({b.doc_id for b in books}) == 2
    for book in books:
        assert book.doc_id == f"{book.meta['author']}/{book.meta['title']}"
        assert len(book.text) > 10_000
        assert not re.search(r"\*\*\* ?(START|END) OF|End of (the )?Project Gutenberg", book.text, re.IGNORECASE)
    assert stats.to_dict()["gutenberg"]["documents"] == 2
