"""ds_vicuna.data.clean: HTML -> Markdown, page artifacts, whitespace, role repairs and every skip reason."""
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from ds_vicuna.data.clean import (Cleaner, CleanOptions, Fix, SkipReason, clean_conversation, clean_file, clean_text,
                             content_hash, fix_roles, is_html_export, read_blocked_words, split_code_blocks)
from ds_vicuna.data.formats import BadRecord, Conversation, load_conversations
from ds_vicuna.chat.messages import Message, Role

ASSETS = Path(__file__).resolve().parents[1] / "assets"
sys.path.insert(0, str(ASSETS))
import make_sample_data  # noqa: E402  (the sample's generator: its Markdown sources and HTML renderer)

U, A, S = Role.USER, Role.ASSISTANT, Role.SYSTEM

SHAREGPT_CODE = ('<div class="markdown prose w-full"><p>Use this:</p><pre><div class="bg-black mb-4 rounded-md">'
                 '<div class="flex items-center"><span class="">python</span><button class="flex ml-auto gap-2">'
                 '<svg></svg>Copy code</button></div><div class="p-4 overflow-y-auto">'
                 '<code class="!whitespace-pre hljs language-python">def f(x):\n    if x &lt; 2:   \n\n\n\n'
                 '        return   x\n</code></div></div></pre><p>Done.</p></div>')


def conv(*turns, cid="c"):
    return Conversation(cid, [Message(role, text) for role, text in turns])


def test_sharegpt_code_block_keeps_language_and_every_space():
    assert clean_text(SHAREGPT_CODE) == ("Use this:\n\n```python\ndef f(x):\n    if x < 2:   \n\n\n\n"
                                         "        return   x\n```\n\nDone.")


def test_language_comes_from_the_header_when_the_code_has_no_class():
    html = SHAREGPT_CODE.replace(" language-python", "").replace(">python<", ">javascript<")
    assert clean_text(html).startswith("Use this:\n\n```javascript\ndef f(x):")


def test_lists_tables_links_and_inline_markup_survive():
    html = ('<div class="markdown prose"><p>See <a href="https://example.org">the docs</a> and use '
            '<code>snake_case</code> with <strong>care</strong>:</p><ol><li>one</li><li>two</li></ol>'
            '<ul><li>a</li><li>b</li></ul><table><thead><tr><th>x</th><th>y</th></tr></thead>'
            '<tbody><tr><td>1</td><td>2</td></tr></tbody></table></div>')
    assert clean_text(html) == ("See [the docs](https://example.org) and use `snake_case` with **care**:\n\n"
                                "1. one\n2. two\n\n- a\n- b\n\n| x | y |\n| --- | --- |\n| 1 | 2 |")


def test_every_html_answer_of_the_sample_cleans_back_to_its_markdown_source():
    m = make_sample_data
    sources = [a for _, a in m.IDENTITY_QA + m.GENERAL_QA + m.HOWTO + m.CODE + m.WRITING + m.LONG_EXPLANATIONS]
    for source in sources:
        assert clean_text(m.markdown_to_sharegpt_html(source)) == source


@pytest.mark.parametrize("raw, cleaned", [
    ("1 / 1Who are you?", "Who are you?"),
    ("2 / 2\nFix my code", "Fix my code"),
    ("3 / 4 of a cup is how much?", "3 / 4 of a cup is how much?"),
    ("Answer.\n\nCopy to clipboard\nMore.\nRegenerate response\n", "Answer.\n\nMore."),
    ("line   \n\n\n\n\n\nnext\t \r\nend\xa0", "line\n\n\nnext\nend"),  # at most two blank lines
    ("How do I center a <div>?", "How do I center a <div>?"),  # a mention, not markup
    ("Sure:\n```\npythonCopy code\nx  =  1   \n```\n", "Sure:\n```python\nx  =  1   \n```"),
    ("```html\n<p>keep</p>\n```", "```html\n<p>keep</p>\n```"),  # HTML inside code is code
    ("text\n```\nunclosed   \n\n", "text\n```\nunclosed   \n\n"),  # code to the end is never touched
])
def test_clean_text_artifacts_and_whitespace(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_split_code_blocks_and_html_detection():
    text = "a\n```py\nx\n```\nb\n~~~\ny"
    assert split_code_blocks(text) == [(False, "a"), (True, "```py\nx\n```"), (False, "b"), (True, "~~~\ny")]
    assert is_html_export("<p>hi</p>") and is_html_export(SHAREGPT_CODE)
    for markdown in ("a<br>b", "```html\n<p>hi</p>\n```", "if a < b and c > d", "Use the `<br>` tag",
                     "<p>one</p> and then <p>two</p>", "<div> opens a block, </p> closes a paragraph",
                     "<p>unclosed <b>bold</p>"):
        assert not is_html_export(markdown), markdown


def test_fix_roles_merges_and_drops_with_counts():
    fixes = Counter()
    messages = [Message(A, "tail of an earlier chat"), Message(U, "Part one."), Message(U, "Part two."),
                Message(A, "Reply."), Message(A, "More reply."), Message(U, "unanswered")]
    assert fix_roles(messages, fixes) == [Message(U, "Part one.\n\nPart two."), Message(A, "Reply.\n\nMore reply.")]
    assert fixes == {Fix.MERGED_TURN: 2, Fix.DROPPED_LEADING_ASSISTANT: 1, Fix.DROPPED_TRAILING_USER: 1}
    system_first = [Message(S, "Be brief."), Message(A, "stale"), Message(U, "Hi"), Message(A, "Hello")]
    assert fix_roles(system_first) == [Message(S, "Be brief."), Message(U, "Hi"), Message(A, "Hello")]
    assert fix_roles([Message(U, "Hi"), Message(A, "Yo"), Message(S, "x"), Message(U, "a"), Message(A, "b")]) \
        is SkipReason.BAD_ROLE_ORDER
    assert fix_roles([Message(U, "Anyone?")]) is SkipReason.NO_REPLY


@pytest.mark.parametrize("turns, options, reason", [
    ([(U, "Hi"), (A, "<p> </p>")], CleanOptions(), SkipReason.EMPTY_TURN),
    ([(U, "Hi"), (A, "Yo")], CleanOptions(min_chars=3), SkipReason.TOO_SHORT),
    ([(U, "Hi"), (A, "As an AI Language Model, I can't.")], CleanOptions(blocked_words=("as an AI language model",)),
     SkipReason.BLOCKED_WORD),
    ([(U, "¿Cuál es la capital de Francia?"), (A, "La capital de Francia es París, su ciudad más grande.")],
     CleanOptions(lang="en"), SkipReason.WRONG_LANGUAGE),
    ([(U, "Hi"), (A, "Hello"), (S, "late system"), (U, "a"), (A, "b")], CleanOptions(), SkipReason.BAD_ROLE_ORDER),
])
def test_each_skip_reason(turns, options, reason):
    assert clean_conversation(conv(*turns), Cleaner(options)) is reason


def test_filters_keep_what_they_should():
    cleaner = Cleaner(CleanOptions(lang="en", blocked_words=("OpenAI",), min_chars=2))
    kept = clean_conversation(conv((U, "What is the capital of France?"),
                                   (A, "The capital of France is Paris, its largest city.")), cleaner)
    assert isinstance(kept, Conversation)
    # Blocked words match whole words only: "OpenAIR" is another word.
    assert isinstance(clean_conversation(conv((U, "Is the OpenAIR festival in June?"),
                                              (A, "Yes, the festival is held every June.")), cleaner), Conversation)


def test_content_hash_ignores_ids_but_not_roles():
    a = conv((U, "x"), (A, "y"), cid="1")
    assert content_hash(a.messages) == content_hash(conv((U, "x"), (A, "y"), cid="2").messages)
    assert content_hash(a.messages) != content_hash(conv((U, "y"), (A, "x")).messages)


def test_clean_file_drops_duplicates_keeping_the_first(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "<p>4</p>"}]}
               for i, q in enumerate(["2+2?", "2+2?", "two plus two?"])]
    records[1]["conversations"][1]["value"] = "4"  # the same after cleaning
    source = tmp_path / "in.json"
    source.write_text(json.dumps(records))
    report = clean_file(source, tmp_path / "out.jsonl", workers=1, progress=False)
    assert [c.id for c in load_conversations(tmp_path / "out.jsonl")] == ["0", "2"]
    assert (report.total, report.kept, dict(report.skipped)) == (3, 2, {SkipReason.DUPLICATE: 1})
    assert report.as_dict()["skipped"] == {"duplicate": 1}


def test_clean_file_counts_bad_records_only_with_skip_bad(tmp_path):
    from ds_vicuna.data.formats import FormatError

    with pytest.raises(FormatError, match="unknown role 'robot'"):
        clean_file(ASSETS / "bad_records.json", tmp_path / "o.jsonl", workers=1, progress=False)
    report = clean_file(ASSETS / "bad_records.json", tmp_path / "o.jsonl", workers=1, skip_bad=True, progress=False)
    assert report.kept == 1 and report.total == 6
    assert report.skipped[BadRecord.UNKNOWN_ROLE] == 1 and report.skipped[BadRecord.NON_STRING] == 1
    assert "skipped: unknown_role" in report.table()


def test_blocked_words_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# comment\nOpenAI\n\n  as an AI language model \n")
    assert read_blocked_words(path) == ("OpenAI", "as an AI language model")
    with pytest.raises(ValueError, match="min_chars"):
        CleanOptions(min_chars=-1)


# ---- Markdown is never rewritten; only ShareGPT HTML exports are converted ---------------------------------

OPENAI_ANSWER = """Here is a minimal page:

```html
<!DOCTYPE html>
<div class="box">
  <p>Hello</p>   
</div>
```

Steps:

1. Save it as `index.html`.
   - open it in a browser
   - check the `<div>` renders


2. Edit the `<p>...</p>` text.

Use the `<br>` tag for a line break, or end a line with two spaces,  
like this one."""


@pytest.mark.parametrize("text", [
    "Use the `<br>` tag to break a line.",
    "Wrap it in `<p>...</p>` and you are done.",
    "How do I center a <div> inside </div>?",
    OPENAI_ANSWER,
])
def test_markdown_that_mentions_html_is_kept_as_it_is(text):
    fixes = Counter()
    assert clean_text(text, Role.ASSISTANT, fixes) == text
    assert not fixes


def test_user_turns_keep_pasted_html():
    pasted = '<div class="box"><p>Hello</p></div>'
    cleaned = clean_conversation(conv((U, pasted), (A, "That div holds one paragraph.")), Cleaner(CleanOptions()))
    assert cleaned.messages[0].content == pasted


def test_html_export_tables_escape_pipes_and_br_is_a_hard_break():
    fixes = Counter()
    html = ('<div class="markdown prose"><p>First line<br>second line</p><table><thead><tr><th>op</th>'
            '<th>meaning</th></tr></thead><tbody><tr><td><code>a|b</code></td><td>or<br>union</td></tr></tbody>'
            '</table></div>')
    assert clean_text(html, Role.ASSISTANT, fixes) == ("First line  \nsecond line\n\n| op | meaning |\n| --- | --- |\n"
                                                       "| `a\\|b` | or<br>union |")
    assert fixes == {Fix.HTML_CONVERTED: 1}
    assert clean_text(html, Role.USER) == html  # what a user typed is never converted


@pytest.mark.parametrize("raw, cleaned, fix", [
    ("Run:\n```bashCopy code\nls -la\n```", "Run:\n```bash\nls -la\n```", Fix.COPY_CODE),
    ("```\npythonCopy codeimport os\nprint(os.sep)\n```", "```python\nimport os\nprint(os.sep)\n```", Fix.COPY_CODE),
    ("```pythonCopy codeimport os\n```", "```python\nimport os\n```", Fix.COPY_CODE),
    ("Before\n```\nCopy code\n```\nAfter", "Before\nAfter", Fix.COPY_CODE),  # the export's empty block
    ("Done.Copy5 chars / 1 words", "Done.", Fix.COPY_CHARS),
    ("1 / 1Who are you?", "Who are you?", Fix.PAGE_COUNTER),
    ("Answer.\nRegenerate response", "Answer.", Fix.PAGE_BUTTON_LINE),
])
def test_fastchat_export_artifacts_are_removed_and_counted(raw, cleaned, fix):
    fixes = Counter()
    assert clean_text(raw, Role.ASSISTANT, fixes) == cleaned
    assert fixes == {fix: 1}


def test_a_canned_error_reply_ends_the_conversation():
    fixes = Counter()
    turns = [(U, "Explain DNS."), (A, "DNS maps names to addresses."), (U, "And DHCP?"),
             (A, "Too many requests in 1 hour. Try again later."), (U, "And DHCP?"), (A, "DHCP leases addresses.")]
    cleaned = clean_conversation(conv(*turns), Cleaner(CleanOptions()), fixes)
    assert [m.content for m in cleaned.messages] == ["Explain DNS.", "DNS maps names to addresses."]
    assert fixes == {Fix.CUT_AT_CANNED_REPLY: 1}
    assert clean_conversation(conv(*turns[2:4]), Cleaner(CleanOptions())) is SkipReason.CANNED_REPLY
    assert clean_conversation(conv((U, "x"), (A, "!Too many requests in 1 hour. Try again later.")),
                              Cleaner(CleanOptions())) is SkipReason.CANNED_REPLY


def test_short_english_is_not_judged_by_language():
    fixes = Counter()
    cleaner = Cleaner(CleanOptions(lang="en"))
    kept = clean_conversation(conv((U, "Hi"), (A, "Hello!")), cleaner, fixes)  # langdetect alone says Finnish
    assert isinstance(kept, Conversation) and fixes == {Fix.LANGUAGE_NOT_JUDGED: 1}
    long_french = conv((U, "Bonjour, pouvez-vous m'expliquer comment fonctionne la photosynthèse ?"),
                       (A, "Bien sûr : les plantes transforment la lumière du soleil en énergie chimique."))
    assert clean_conversation(long_french, cleaner) is SkipReason.WRONG_LANGUAGE


def test_merged_replies_keep_weight_zero_and_truncation():
    merged = fix_roles([Message(U, "q"), Message(A, "a", weight=0), Message(A, "b", truncated=True)])
    assert merged == [Message(U, "q"), Message(A, "a\n\nb", weight=0, truncated=True)]


# ---- property: Markdown in -> the same Markdown out -------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PLAIN_WORDS = st.sampled_from(["the", "tag", "Use", "a", "line", "break", "value", "é", "日本", "3", "x_y", "*a*",
                               "**b**", "[link](https://e.org)", "(see)", "-", "1.", "&amp;", "a|b"])
HTML_MENTIONS = st.sampled_from(["<br>", "<br/>", "<div>", "</div>", "<p>", "</p>", '<span class="x">', "</td>",
                                 "`<br>`", "`<p>...</p>`", "`<div class=\"box\">`", "`</table>`", "<3", "a < b > c"])
WORD = st.one_of(PLAIN_WORDS, PLAIN_WORDS, HTML_MENTIONS)


@st.composite
def markdown_line(draw):
    return " ".join([draw(PLAIN_WORDS)] + draw(st.lists(WORD, max_size=8)))  # starts with a plain word


@st.composite
def markdown_block(draw):
    kind = draw(st.sampled_from(["paragraph", "heading", "list", "code", "table", "quote"]))
    if kind == "paragraph":
        lines = draw(st.lists(markdown_line(), min_size=1, max_size=4))
        breaks = draw(st.lists(st.booleans(), min_size=len(lines), max_size=len(lines)))
        return "\n".join(line + ("  " if hard and i < len(lines) - 1 else "")
                         for i, (line, hard) in enumerate(zip(lines, breaks)))
    if kind == "heading":
        return "#" * draw(st.integers(1, 4)) + " " + draw(markdown_line())
    if kind == "list":
        items = []
        for depth in draw(st.lists(st.integers(0, 2), min_size=1, max_size=5)):
            depth = min(depth, items[-1][0] + 1 if items else 0)  # nest at most one level deeper
            items.append((depth, draw(st.sampled_from(["- ", "1. ", "* "])) + draw(markdown_line())))
        return "\n".join("  " * depth + text for depth, text in items)
    if kind == "code":
        language = draw(st.sampled_from(["", "html", "python", "bash"]))
        body = draw(st.lists(st.sampled_from(["<div>", "  <p>x</p>   ", "", "\tindent", "x = 1  ", "<br>",
                                              "Copy code later", "</div>"]), max_size=5))
        return "\n".join([f"```{language}"] + body + ["```"])
    if kind == "table":
        rows = draw(st.lists(st.tuples(markdown_line(), markdown_line()), min_size=1, max_size=3))
        cells = [(a.replace("|", "\\|"), b.replace("|", "\\|")) for a, b in rows]
        return "\n".join(["| a | b |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in cells])
    return "> " + draw(markdown_line())


@st.composite
def markdown_documents(draw):
    blocks = draw(st.lists(markdown_block(), min_size=1, max_size=6))
    separators = draw(st.lists(st.sampled_from(["\n\n", "\n\n\n"]), min_size=len(blocks), max_size=len(blocks)))
    return "".join(block + sep for block, sep in zip(blocks, separators)).rstrip("\n")


@settings(max_examples=300, deadline=None)
@given(text=markdown_documents(), role=st.sampled_from([Role.USER, Role.ASSISTANT, Role.SYSTEM]))
def test_markdown_in_is_the_same_markdown_out(text, role):
    fixes = Counter()
    assert clean_text(text, role, fixes) == text
    assert not fixes


def test_html_a_user_asked_for_stays_and_page_exports_are_still_converted():
    asked = "<div>\n  <p>Hello, <b>world</b>!</p>\n</div>"
    fixes = Counter()
    cleaned = clean_conversation(conv((U, "Write that greeting as HTML."), (A, asked)), Cleaner(CleanOptions()),
                                 fixes)
    assert cleaned.messages[1].content == asked and fixes == Counter()
    assert not is_html_export(asked)
    assert is_html_export("<div><p>Hello, <b>world</b>!</p></div>")  # run together, as the page serialised it
    laid_out_export = '<div class="markdown prose w-full">\n  <p>Hello, <b>world</b>!</p>\n</div>'
    assert is_html_export(laid_out_export) and clean_text(laid_out_export) == "Hello, **world**!"


@pytest.mark.parametrize("raw, role, cleaned, counted", [
    ("one\r\ntwo", U, "one\ntwo", {Fix.LINE_ENDINGS: 1}),
    ("one\rtwo", A, "one\ntwo", {Fix.LINE_ENDINGS: 1}),
    ("\n\n  Hi there  \n\n", U, "  Hi there", {Fix.WHITESPACE: 1}),
    ("a\n\n\n\n\nb", A, "a\n\n\nb", {Fix.WHITESPACE: 1}),
    ("a\r\nb   \r\n", A, "a\nb", {Fix.LINE_ENDINGS: 1, Fix.WHITESPACE: 1}),
    ("Line with a hard break  \nnext", A, "Line with a hard break  \nnext", {}),
    ("  indented first line stays", U, "  indented first line stays", {}),
])
def test_every_whitespace_and_line_ending_change_is_counted(raw, role, cleaned, counted):
    fixes = Counter()
    assert clean_text(raw, role, fixes) == cleaned
    assert fixes == Counter(counted)
