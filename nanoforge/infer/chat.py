"""Chat with a model artifact in the terminal: the chat template, streamed tokens, several turns.

    nanoforge chat --model runs/demo/08-pretrain --system "You answer briefly." --temperature 0.7

Each turn renders the whole conversation with the tokenizer's chat template (`Tokenizer.render_prompt`:
`<|bos|>`, one `<|role_start|> … <|role_end|>` block per message, then `<|assistant_start|>`) and streams
the reply until `<|assistant_end|>`, `<|bos|>` or `--max-new-tokens`. Text appears as it is decoded: a
character whose UTF-8 bytes are split across tokens is written once its last byte arrives (`TextStream`).
When the conversation outgrows the model's context the oldest turns are dropped (the system message
stays). `/reset` starts over, `/exit` or Ctrl-D leaves, Ctrl-C stops a reply.

`ChatModel` (a loaded model + tokenizer + template + stop tokens) and `TextStream` are shared with the
HTTP server, `nanoforge/infer/server.py`.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nanoforge.errors import NanoforgeError
from nanoforge.infer.batching import ContinuousBatch
from nanoforge.infer.engine import Decoder, stream
from nanoforge.model import GPT
from nanoforge.tokenizer import Tokenizer
from nanoforge.train.checkpoint import load_model_artifact
from nanoforge.train.hardware import pick_device

Message = dict[str, str]


@dataclass
class Sampling:
    """How one reply is drawn: the engine's sampling settings (temperature 0 is greedy)."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise NanoforgeError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise NanoforgeError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise NanoforgeError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise NanoforgeError(f"--top-p must be in (0, 1], got {self.top_p}")


class ChatModel:
    """A model artifact ready to talk: the GPT, its tokenizer, the chat template and the stop tokens.

        cm = ChatModel.load("runs/demo/08-pretrain")
        prompt = cm.chat_prompt([{"role": "user", "content": "hi"}])
        reply = cm.tok.decode(cm.stream(prompt, Sampling(temperature=0), cm.chat_stop))
    """

    def __init__(self, model: GPT, tok: Tokenizer, name: str = "model") -> None:
        if tok.vocab_size > model.cfg.vocab_size:
            raise NanoforgeError(f"{name}: the tokenizer has {tok.vocab_size} tokens but the model only "
                                 f"{model.cfg.vocab_size} (not the tokenizer it was trained with)")
        self.model, self.tok, self.name = model, tok, name
        # the weights stay fixed while a ChatModel serves: the decode step is prepared once, at the first reply
        self.decoder = Decoder(model)
        # a chat reply ends at the end of its turn, or at a document boundary for a base model
        self.chat_stop = (tok.special_id("assistant_end"), tok.bos_id)
        self.text_stop = (tok.bos_id,)

    @classmethod
    def load(cls, model_dir: Path | str, device: str = "auto") -> ChatModel:
        """The model in `model_dir` (as `nanoforge pretrain`/`sft` write it), named after the directory."""
        model_dir = Path(model_dir)
        model = load_model_artifact(model_dir, pick_device(device))
        return cls(model, Tokenizer.load(model_dir), name=model_dir.resolve().name)

    @property
    def seq_len(self) -> int:
        """The context: prompt + reply tokens never exceed it."""
        return self.model.cfg.seq_len

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the conversation followed by `<|assistant_start|>`, from which the reply is generated."""
        return self.tok.render_prompt(messages)

    def text_prompt(self, text: str) -> list[int]:
        """Ids of a plain-text prompt to continue: `<|bos|>` (a document starts) then the text."""
        return [self.tok.bos_id, *self.tok.encode(text)]

    def stream(self, prompt: list[int], sampling: Sampling, stop_tokens: Sequence[int]) -> Generator[int, None, None]:
        """The reply's token ids, each as soon as it is sampled (the stop token is not yielded)."""
        return stream(self.model, prompt, max_new_tokens=sampling.max_new_tokens,
                      temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                      stop_tokens=stop_tokens, seed=sampling.seed, decoder=self.decoder)


    def batch(self, max_batch: int) -> ContinuousBatch:
        """A continuous batch over this model (what `nanoforge serve` decodes concurrent requests with)."""
        return ContinuousBatch(self.model, max_batch, decoder=self.decoder)


class TextStream:
    """Token ids in, text out as soon as it is whole.

    Byte-level tokens can split one character's UTF-8 bytes (é is two bytes, 😀 four); decoding such a
    prefix gives U+FFFD. So the ids since the last complete character are held until their text no
    longer ends in U+FFFD; `flush` writes whatever is left (a truly broken byte then shows as U+FFFD).
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._held: list[int] = []

    def push(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is still incomplete)."""
        self._held.append(token)
        text = self.tok.decode(self._held)
        if text.endswith("\ufffd"):
            return ""
        self._held.clear()
        return text

    def flush(self) -> str:
        """The text of the held ids, complete or not."""
        text = self.tok.decode(self._held) if self._held else ""
        self._held.clear()
        return text


@dataclass
class ChatConfig:
    """What `nanoforge chat` is given: the system message and how replies are sampled."""

    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0  # turn i samples with seed + i: a rerun of the same conversation gives the same replies

    def __post_init__(self) -> None:
        Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)  # refuses bad settings


HELP = "type a message; /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply"


def fit_conversation(cm: ChatModel, system: list[Message], turns: list[Message],
                     reserve: int) -> tuple[list[int], int]:
    """The prompt of `system + turns` without its oldest turns, leaving `reserve` tokens for the reply, and how
    many turns it left out (the caller drops them). Raises NanoforgeError if even the last message alone
    does not fit; `turns` itself is never changed, so a refused message costs the conversation nothing."""
    limit = cm.seq_len - reserve
    start = 0
    prompt = cm.chat_prompt(system + turns)
    while len(prompt) > limit and len(turns) - start > 1:
        start += 1
        while start < len(turns) and turns[start]["role"] != "user":  # a conversation restarts on a user message
            start += 1
        prompt = cm.chat_prompt(system + turns[start:])
    if len(prompt) > limit:
        raise NanoforgeError(f"the message is {len(prompt)} tokens with the template; the model's context is "
                             f"{cm.seq_len} and {reserve} are kept for the reply: write less")
    return prompt, start


def chat(cm: ChatModel, cfg: ChatConfig, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Talk with `cm` until `/exit` or end of input; replies go to `stdout`, notes to `stderr`.

    The "> " prompt is shown only when `stdin` is a terminal, so piped input gives just the replies, one
    per line. Returns the number of replies written.
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    system = [{"role": "system", "content": cfg.system}] if cfg.system else []
    reserve = min(cfg.max_new_tokens, cm.seq_len // 2)
    fit_conversation(cm, system, [], reserve)  # refuses a system message that leaves no room for a turn
    interactive = stdin.isatty()
    print(f"chatting with {cm.name} (context {cm.seq_len} tokens); {HELP}", file=stderr)
    turns: list[Message] = []
    replies = 0
    while True:
        line = _read_line(stdin, stdout, interactive)
        if line is None:  # end of input (Ctrl-D)
            return replies
        text = line.rstrip("\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            return replies
        if command == "/reset":
            turns.clear()
            print("(conversation reset)", file=stderr)
            continue
        if not command:
            continue
        turns.append({"role": "user", "content": text})
        try:
            prompt, dropped = fit_conversation(cm, system, turns, reserve)
        except NanoforgeError as e:
            turns.pop()
            print(f"error: {e}", file=stderr)
            continue
        if dropped:
            del turns[:dropped]
            print(f"(dropped the oldest {dropped} messages: the context holds {cm.seq_len} tokens)", file=stderr)
        sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, seed=cfg.seed + replies)
        turns.append({"role": "assistant", "content": _reply(cm, prompt, sampling, stdout, stderr)})
        replies += 1


def _read_line(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    """The next line typed, None at end of input or Ctrl-C. On a terminal, "> " is shown first, and for
    the process's own terminal `input()` gives line editing and history."""
    try:
        if interactive and stdin is sys.stdin and stdout is sys.stdout:
            import readline  # noqa: F401  (imported for its effect: input() gains editing and history)

            return input("> ")
        if interactive:
            stdout.write("> ")
            stdout.flush()
        return stdin.readline() or None
    except (EOFError, KeyboardInterrupt):
        if interactive:
            stdout.write("\n")
        return None


def _reply(cm: ChatModel, prompt: list[int], sampling: Sampling, stdout: TextIO, stderr: TextIO) -> str:
    """Stream one reply to `stdout` as it is decoded; returns its text (what was shown, if Ctrl-C cut it)."""
    decoder, pieces = TextStream(cm.tok), []
    tokens = cm.stream(prompt, sampling, cm.chat_stop)
    try:
        for token in tokens:
            piece = decoder.push(token)
            if piece:
                pieces.append(piece)
                stdout.write(piece)
                stdout.flush()
    except KeyboardInterrupt:
        print("\n(reply stopped)", file=stderr)
    finally:
        tokens.close()
    pieces.append(decoder.flush())
    stdout.write(pieces[-1] + "\n")
    stdout.flush()
    return "".join(pieces)
