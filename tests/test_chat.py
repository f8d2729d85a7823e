"""`nanoforge chat` (nanoforge/infer/chat.py): incremental UTF-8 decoding, turns, reset, context overflow.

python -m pytest tests/test_chat.py -q
"""

from __future__ import annotations

import io
import sys
from collections.abc import Generator
from pathlib import Path

import pytest

from nanoforge.cli import main
from nanoforge.infer.chat import ChatConfig, ChatModel, Sampling, TextStream, chat
from nanoforge.infer.engine import generate


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model: Path) -> Path:
    return tiny_chat_model


@pytest.fixture(scope="module")
def cm(model_dir: Path) -> ChatModel:
    return ChatModel.load(model_dir, "cpu")


class ScriptedModel(ChatModel):
    """Answers turn i with `replies[i]` (token by token) and records the prompts it is given."""

    def __init__(self, base: ChatModel, replies: list[str]) -> None:
        super().__init__(base.model, base.tok, name=base.name)
        self.replies = replies
        self.prompts: list[list[int]] = []

    def stream(self, prompt: list[int], sampling: Sampling, stop_tokens) -> Generator[int, None, None]:
        self.prompts.append(prompt)
        yield from self.tok.encode(self.replies[len(self.prompts) - 1])[: sampling.max_new_tokens]


class Writes(io.StringIO):
    """A stdout that counts its writes (a streamed reply arrives in several)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


TEXT = "héllo wörld — naïve café, 😀 ✓ 日本語 Ωmega"


def test_text_stream_never_splits_a_character(cm: ChatModel) -> None:
    ids = cm.tok.encode(TEXT)
    # the tiny vocabulary spells rare characters as their UTF-8 bytes, one token each: the case at stake
    assert any("\ufffd" in cm.tok.decode([i]) for i in ids)
    stream = TextStream(cm.tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some tokens completed no character and waited
    assert "😀" in pieces  # written whole, once its fourth byte arrived


def test_text_stream_flushes_a_broken_byte_as_replacement(cm: ChatModel) -> None:
    lead = next(i for i in cm.tok.encode("😀") if cm.tok.decode([i]) == "\ufffd")
    stream = TextStream(cm.tok)
    assert stream.push(lead) == ""
    assert stream.push(cm.tok.encode("x")[0]) == "\ufffdx"  # the next character shows the byte was broken
    assert stream.push(lead) == "" and stream.flush() == "\ufffd" and stream.flush() == ""


def test_turns_carry_the_conversation_and_reset_clears_it(cm: ChatModel) -> None:
    scripted = ScriptedModel(cm, ["Hi there.", "Fine, thanks — and you? é", "Hello again."])
    stdin = io.StringIO("hi\nhow are you?\n\n/reset\nagain\n/exit\nnever read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    cfg = ChatConfig(system="Be kind.", temperature=0)
    assert chat(scripted, cfg, stdin, stdout, stderr) == 3
    assert stdout.getvalue() == "Hi there.\nFine, thanks — and you? é\nHello again.\n"
    system = [{"role": "system", "content": "Be kind."}]
    assert scripted.prompts == [
        cm.tok.render_prompt(system + [{"role": "user", "content": "hi"}]),
        cm.tok.render_prompt(system + [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hi there."},
                                       {"role": "user", "content": "how are you?"}]),
        cm.tok.render_prompt(system + [{"role": "user", "content": "again"}]),
    ]
    assert "reset" in stderr.getvalue()


def test_replies_stream_the_models_greedy_tokens(cm: ChatModel) -> None:
    stdout = Writes()
    chat(cm, ChatConfig(temperature=0, max_new_tokens=10), io.StringIO("What does heapq do?\n"), stdout, io.StringIO())
    prompt = cm.chat_prompt([{"role": "user", "content": "What does heapq do?"}])
    expected = generate(cm.model, [prompt], max_new_tokens=10, temperature=0, stop_tokens=cm.chat_stop)[0]
    assert stdout.getvalue() == cm.tok.decode(expected) + "\n"
    assert stdout.writes > 2  # piece by piece, as the tokens were decoded
    step = cm.decoder.step  # the chat's decode step is prepared once, then kept for every later turn
    assert step is not None
    chat(cm, ChatConfig(temperature=0, max_new_tokens=10), io.StringIO("And heapq.merge?\n"), Writes(), io.StringIO())
    assert cm.decoder.step is step and cm.batch(2)._decoder is cm.decoder


def test_oldest_turns_are_dropped_when_the_context_is_full(cm: ChatModel) -> None:
    scripted = ScriptedModel(cm, [f"reply number {i} is here" for i in range(8)])
    questions = [f"question {i} about the json module" for i in range(8)]
    stderr = io.StringIO()
    cfg = ChatConfig(max_new_tokens=10)
    chat(scripted, cfg, io.StringIO("\n".join(questions) + "\n" + "long " * 100 + "\n"), io.StringIO(), stderr)
    assert len(scripted.prompts) == 8  # the over-long last message was refused, the others answered
    assert all(len(p) <= cm.seq_len - 10 for p in scripted.prompts)
    last = cm.tok.decode(scripted.prompts[-1])
    assert last.startswith("<|bos|><|user_start|>") and "question 7" in last and "question 0" not in last
    assert "dropped the oldest" in stderr.getvalue() and "error: the message is" in stderr.getvalue()


def test_a_refused_message_leaves_the_conversation_as_it_was(cm: ChatModel) -> None:
    scripted = ScriptedModel(cm, ["Hi there.", "Again, hi."])
    stderr = io.StringIO()
    chat(scripted, ChatConfig(max_new_tokens=8), io.StringIO("hello\n" + "word " * 100 + "\nagain\n"), io.StringIO(),
         stderr)
    assert "error: the message is" in stderr.getvalue() and "dropped" not in stderr.getvalue()
    # trying to fit the over-long message dropped no earlier turn: the next one still sees them
    assert scripted.prompts[1] == cm.tok.render_prompt([
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "again"}])


def test_cli_chat_reads_stdin_and_refuses_bad_flags(model_dir: Path, cm: ChatModel, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    prompt = cm.chat_prompt([{"role": "user", "content": "hello"}])
    expected = generate(cm.model, [prompt], max_new_tokens=6, temperature=0, stop_tokens=cm.chat_stop)[0]
    out = capsys.readouterr()
    assert out.out == cm.tok.decode(expected) + "\n" and "chatting with tiny-chat" in out.err
    assert main(["chat", "--model", str(model_dir), "--top-p", "2"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
