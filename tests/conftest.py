"""Shared tiny artifacts: a pydoc corpus of a few modules, a small tokenizer and its token shards.

Built once per test session (a few seconds) and treated as read-only by the tests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from nanoforge.config import PretrainConfig

TINY_MODULES = ["json", "textwrap", "string", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys",
                "base64", "calendar", "difflib"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    from nanoforge.data.pydoc_corpus import CorpusConfig, build_corpus

    out = tmp_path_factory.mktemp("corpus") / "docs"
    build_corpus(CorpusConfig(modules=TINY_MODULES, workers=1), out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus, tmp_path_factory) -> Path:
    from nanoforge.tokenizer import TokenizerConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TokenizerConfig(vocab_size=512), tiny_corpus, out)
    return out


@pytest.fixture(scope="session")
def tiny_tokens(tiny_corpus, tiny_tokenizer, tmp_path_factory) -> Path:
    from nanoforge.tokens import TokenizeConfig, tokenize

    out = tmp_path_factory.mktemp("tokens") / "tokens"
    tokenize(TokenizeConfig(val_fraction=0.2, workers=1), tiny_corpus, tiny_tokenizer, out)
    return out


def tiny_pretrain_config(**overrides) -> PretrainConfig:
    """A model of ~0.1 M parameters that trains a few dozen steps in seconds."""
    values = dict(preset="cpu-tiny", depth=2, aspect=32, head_dim=16, seq_len=64, batch_size=4,
                  batch_tokens=256, max_steps=30, warmup_steps=5, lr=3e-3, eval_every=10, eval_batches=2,
                  sample_every=0, ckpt_every=10, dtype="fp32", seed=0)
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_tokenizer, tmp_path_factory) -> Path:
    """A model artifact as `nanoforge pretrain` writes it, named `tiny-chat`: random weights, sharpened so
    greedy replies are fixed (not meaningful) rather than noise."""
    import torch

    from nanoforge.model import GPT, ModelConfig
    from nanoforge.tokenizer import Tokenizer
    from nanoforge.train.checkpoint import save_model_artifact

    torch.manual_seed(0)
    tok = Tokenizer.load(tiny_tokenizer)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=64, n_layer=2, n_embd=32, n_head=4))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    out = tmp_path_factory.mktemp("model") / "tiny-chat"
    save_model_artifact(model, out, tokenizer_dir=tiny_tokenizer)
    return out


# headless Chromium for the web-page tests: Debian's package, driven by Playwright (never `playwright install`)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (make test does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    p = context.new_page()
    p.dialogs = []  # every alert() the page would show: none may fire
    p.on("dialog", lambda d: (p.dialogs.append(d.message), d.dismiss()))
    yield p
    context.close()


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    """Stages set torch's thread count from their config (`threads`); no test leaks it to the next."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def setting(tiny_tokenizer, tmp_path_factory):
    """The RLHF toy (tests/rlhf_toy.py): an SFT model and simulated preferences, built once per session."""
    from rlhf_toy import toy

    return toy(tmp_path_factory.getbasetemp() / "rlhf-toy", tiny_tokenizer)


class StreamBatch:
    """The server's batch interface (`ContinuousBatch`'s add / cancel / step / busy) over one token generator
    per sequence, `make(prompt, sampling, stop_tokens)` (a scripted `ChatModel.stream`): each step takes one
    token from every running generator, so a test can script replies and hold the worker inside a step."""

    def __init__(self, make, max_batch: int) -> None:
        self.make, self.max_batch = make, max_batch
        self.running: dict[int, Iterator[int]] = {}
        self.waiting: list[tuple] = []
        self._next = 0

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, prompt, *, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(), seed=None):
        from nanoforge.infer.chat import Sampling

        handle, self._next = self._next, self._next + 1
        self.waiting.append((handle, prompt, Sampling(max_new_tokens, temperature, top_k, top_p, seed), stop_tokens))
        return handle

    def cancel(self, handle: int) -> None:
        self.waiting = [w for w in self.waiting if w[0] != handle]
        tokens = self.running.pop(handle, None)
        if tokens is not None:
            tokens.close()

    def step(self) -> list[tuple[int, int | None]]:
        while self.waiting and len(self.running) < self.max_batch:
            handle, *args = self.waiting.pop(0)
            self.running[handle] = self.make(*args)
        events = []
        for handle, tokens in list(self.running.items()):
            events.append((handle, next(tokens, None)))
            if events[-1][1] is None:
                del self.running[handle]
        return events
