"""The demo's instruction data (`nanoforge instruct`) and the answer scoring that SFT and eval report."""

from __future__ import annotations

import inspect
import json
import pydoc
import textwrap

import pytest

from nanoforge.cli import main
from nanoforge.post.instruct import (
    DocEntry,
    InstructConfig,
    answer_f1,
    exact_match,
    first_sentence,
    identity_answers,
    make_instruct,
    module_name,
    parse_pydoc,
    read_chat_jsonl,
)
from nanoforge.post.tasks import get_task

# The main text the demo's extractor takes from pydoc's HTML page of textwrap (abridged, verbatim lines).
EXTRACTED_TEXTWRAP = """textwrap\t\tindex
<python>/lib/python3.11/textwrap.py
Module Reference

Text wrapping and filling.

␠
Classes
      \t\t␠
builtins.object
TextWrapper

␠
class TextWrapper(builtins.object)
   \t\tTextWrapper(width=70, initial_indent='', subsequent_indent='', tabsize=8, *, max_lines=None)
␠
Object for wrapping/filling text.  The public interface consists of
the wrap() and fill() methods.
␠
 \t\tMethods defined here:
fill(self, text)
fill(text : string) -> string
␠
Reformat the single paragraph in 'text' to fit in lines.

␠
Functions
      \t\t␠
dedent(text)
Remove any common leading whitespace from every line in `text`.
␠
This can be used to make triple-quoted strings line up with the left
edge of the display, for example:
sample(['red', 'blue'], counts=[4, 2], k=5)
fill(text, width=70, **kwargs)
Fill a single paragraph of text, returning a new string.
_private(x)
Not public.
indent(text, prefix, predicate=None)
Adds 'prefix' to the beginning of selected lines in 'text'.

␠
Data
      \t\t␠
__all__ = ['TextWrapper', 'wrap', 'fill', 'dedent', 'indent', 'shorten']
""".replace("␠", " ")  # ␠ marks a line that ends in a space


def test_plain_pydoc_pages_give_each_function_its_signature_and_first_sentence():
    text = pydoc.render_doc(textwrap, renderer=pydoc.plaintext)
    assert module_name(text) == "textwrap"
    entries = {e.name: e for e in parse_pydoc(text, "textwrap")}
    public = {n for n, f in vars(textwrap).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert public <= set(entries)
    assert entries["dedent"].signature == str(inspect.signature(textwrap.dedent))
    assert entries["fill"].signature == "(text, width=70, **kwargs)"
    assert first_sentence(entries["dedent"], 200) == "Remove any common leading whitespace from every line in `text`."
    wrapper = entries["TextWrapper"]
    assert wrapper.kind == "class" and wrapper.signature.startswith("(width=70, initial_indent=''")
    assert first_sentence(wrapper, 200) == "Object for wrapping/filling text."
    assert "Methods defined here" not in wrapper.doc  # the class's own docstring only


def test_text_extracted_from_pydoc_html_is_parsed_the_same_way():
    assert module_name(EXTRACTED_TEXTWRAP, "http://127.0.0.1:8000/textwrap.html") == "textwrap"
    assert module_name("", "pydoc:email.mime.text") == "email.mime.text"
    entries = {e.name: e for e in parse_pydoc(EXTRACTED_TEXTWRAP, "textwrap")}
    # the example call in dedent's docstring is not a function; the private one is skipped
    assert sorted(entries) == ["TextWrapper", "dedent", "fill", "indent"]
    assert entries["fill"].signature == "(text, width=70, **kwargs)"
    assert first_sentence(entries["fill"], 200) == "Fill a single paragraph of text, returning a new string."
    assert entries["TextWrapper"].signature.startswith("(width=70,")
    assert first_sentence(entries["TextWrapper"], 200) == "Object for wrapping/filling text."
    assert "sample([" in entries["dedent"].doc and "Fill a single" not in entries["dedent"].doc


def test_first_sentence_skips_repeated_signatures_and_refuses_fragments():
    doc = "fill(text : string) -> string\n\nReformat the text.  More here."
    e = DocEntry("heapq", "fill", "function", "(text)", doc)
    assert first_sentence(e, 200) == "Reformat the text."
    e = DocEntry("m", "f", "function", "(x)", "is equivalent to:")
    assert first_sentence(e, 200) is None
    e = DocEntry("m", "f", "function", "(x)", "Use e.g. this one to do things.  Then more.")
    assert first_sentence(e, 200) == "Use e.g. this one to do things."


@pytest.fixture(scope="module")
def instruct_dir(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("instruct") / "data"
    cfg = InstructConfig(max_entries=200, arithmetic=300, arithmetic_val=30, val_fraction=0.2)
    make_instruct(cfg, tiny_corpus, out)
    return out


def _by_subset(chats):
    out = {}
    for c in chats:
        out.setdefault(c["subset"], []).append(c)
    return out


def _about(chat):
    """The qualified name a documentation question is about."""
    return chat["messages"][0]["content"].split("`")[1]


def test_held_out_questions_are_about_functions_and_paraphrases_never_trained_on(instruct_dir):
    train, val = (read_chat_jsonl(instruct_dir / f"{s}.jsonl") for s in ("train", "val"))
    tr, va = _by_subset(train), _by_subset(val)
    assert set(tr) == set(va) == {"doc_summary", "doc_what", "doc_args", "doc_module", "identity", "arithmetic"}
    for subset in ("doc_summary", "doc_what", "doc_args", "doc_module"):
        assert va[subset] and not {_about(c) for c in va[subset]} & {_about(c) for c in tr[subset]}
    questions = lambda chats: {c["messages"][0]["content"] for c in chats}  # noqa: E731
    assert va["identity"] and not questions(va["identity"]) & questions(tr["identity"])
    assert {c["messages"][1]["content"] for c in va["identity"]} <= set(identity_answers("nanoforge").values())
    task = get_task("arithmetic")
    heldout = task.heldout(30)
    assert questions(va["arithmetic"]) == {p.prompt for p in heldout} and len(va["arithmetic"]) == 30
    assert not questions(va["arithmetic"]) & questions(tr["arithmetic"])
    for c in va["arithmetic"]:
        p = next(p for p in heldout if p.prompt == c["messages"][0]["content"])
        assert c["messages"][1]["content"] == task.demonstration(p)
    m = json.loads((instruct_dir / "manifest.json").read_text())
    assert m["figures"]["train"] == len(train) and m["figures"]["val"] == len(val)


def test_documentation_answers_come_from_the_documents(instruct_dir):
    chats = read_chat_jsonl(instruct_dir / "train.jsonl") + read_chat_jsonl(instruct_dir / "val.jsonl")
    args = {_about(c): c["messages"][1]["content"] for c in chats if c["subset"] == "doc_args"}
    assert args["json.dumps"].startswith("`json.dumps(obj, *, skipkeys=False")
    what = {_about(c): c["messages"][1]["content"] for c in chats if c["subset"] == "doc_what"}
    assert what["heapq.heappush"] == "Push item onto heap, maintaining the heap invariant."
    module = {_about(c): c["messages"][1]["content"] for c in chats if c["subset"] == "doc_module"}
    assert module["heappush"] == "The `heapq` module."


def test_a_name_documented_by_several_modules_gets_no_module_question(tmp_path):
    from nanoforge.data.documents import Document, write_document_shards

    def page(module, *functions):
        body = "".join(f"    {f}(obj)\n        Turn the object into text for {module}.\n\n" for f in functions)
        return Document(id=module, text=f"Python Library Documentation: module {module}\n\nFUNCTIONS\n{body}",
                        url=f"pydoc:{module}", source="test")

    write_document_shards([page("alpha", "dumps", "only_alpha"), page("beta", "dumps")], tmp_path / "docs")
    make_instruct(InstructConfig(arithmetic=0, arithmetic_val=0, val_fraction=0.0), tmp_path / "docs", tmp_path / "out")
    chats = read_chat_jsonl(tmp_path / "out" / "train.jsonl")
    asked = {_about(c) for c in chats if c["subset"] == "doc_module"}
    assert asked == {"only_alpha"}
    assert {_about(c) for c in chats if c["subset"] == "doc_what"} == {"alpha.dumps", "alpha.only_alpha", "beta.dumps"}


def test_cli_writes_the_data_and_reports_counts(tiny_corpus, tmp_path, capsys):
    out = tmp_path / "instruct"
    assert main(["instruct", "--docs", str(tiny_corpus), "--out", str(out), "--set", "max_entries=20",
                 "--set", "arithmetic=10", "--set", "arithmetic_val=5"]) == 0
    assert "training and" in capsys.readouterr().out
    figures = json.loads((out / "manifest.json").read_text())["figures"]
    assert len(read_chat_jsonl(out / "train.jsonl")) == figures["train"]
    assert main(["instruct", "--docs", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2


def test_token_f1_and_exact_match_follow_squad():
    assert answer_f1("The cat sat.", "the cat sat") == 1.0 and exact_match("The cat sat.", "a cat sat") == 1.0
    # prediction "cat sat down" vs reference "the cat sat on the mat": 2 common, precision 2/3, recall 2/4
    assert answer_f1("cat sat down", "the cat sat on the mat") == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert answer_f1("dog", "cat") == 0.0 and answer_f1("", "") == 1.0 and answer_f1("", "cat") == 0.0
    ref = "<think>7+5=12, 4+8+1=13</think><answer>132</answer>"
    assert exact_match("<think>wrong steps</think><answer> 132 </answer>", ref) == 1.0
    assert exact_match("<think>7+5=12, 4+8+1=13</think><answer>133</answer>", ref) == 0.0
    assert exact_match("132", ref) == 0.0  # no <answer>: not an answer
    negative = "<think>5-58</think><answer>-53</answer>"  # the sign decides: SQuAD's words would drop it
    assert [exact_match(f"<answer>{a}</answer>", negative) for a in ("-53", " -53 ", "53", "+53", "-5,3")] == [
        1.0, 1.0, 0.0, 0.0, 0.0]
    assert exact_match("<answer>The Cat.</answer>", "<answer>cat</answer>") == 1.0  # text answers: normalised
