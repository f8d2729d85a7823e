import json
import math
from itertools import combinations

import pytest

from nanoforge.errors import NanoforgeError
from nanoforge.eval.evaluate import EvalConfig, EvalInputs, eval_table, pass_at_k, run_eval
from nanoforge.post.reward import RewardModel
from nanoforge.train.checkpoint import load_model_artifact


def test_pass_at_k_is_the_probability_that_k_of_n_samples_hold_a_correct_one():
    for n, c, k in [(4, 0, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (6, 3, 6), (10, 1, 4)]:
        draws = list(combinations([1] * c + [0] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def _val(tmp_path):
    chats = [{"subset": "identity", "messages": [{"role": "user", "content": q},
                                                 {"role": "assistant", "content": "I am nanoforge's model."}]}
             for q in ("Who are you?", "What are you?")]
    chats.append({"subset": "doc_what", "messages": [{"role": "user", "content": "What does `json.dumps` do?"},
                                                     {"role": "assistant", "content": "Serialize obj to JSON."}]})
    (tmp_path / "instruct").mkdir()
    (tmp_path / "instruct" / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return tmp_path / "instruct"


def test_every_task_on_two_models_and_the_table(tmp_path, tiny_chat_model, tiny_tokens, tiny_tokenizer):
    rm = RewardModel(load_model_artifact(tiny_chat_model))
    rm.save(tmp_path / "rm", tiny_tokenizer)
    inputs = EvalInputs(tokens=tiny_tokens, instruct=_val(tmp_path), reward_model=tmp_path / "rm",
                        reference=tiny_chat_model)
    cfg = EvalConfig(arithmetic_problems=6, pass_k=2, eval_batches=1, batch_size=4, max_new_tokens=12)
    m = run_eval(cfg, {"a": tiny_chat_model, "b": tiny_chat_model}, inputs, tmp_path / "eval")
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    a = data["models"]["a"]
    assert set(a) == {"bpb", "doc_qa_f1", "doc_qa_em", "identity_f1", "identity_em", "arithmetic_acc",
                      "arithmetic_pass@2", "reward_win_rate"}
    assert data["models"]["a"] == data["models"]["b"]  # the same weights score the same
    assert a["reward_win_rate"] == 0.5  # against itself every comparison is a tie
    assert 0 < a["bpb"] < 20 and math.isfinite(a["bpb"]) and 0 <= a["arithmetic_acc"] <= a["arithmetic_pass@2"] <= 1
    assert data["samples"]["a"] and m["figures"]["a/bpb"] == a["bpb"]
    assert "reward_win_rate" in eval_table(data)


def test_tasks_without_their_inputs_are_left_out_or_refused(tmp_path, tiny_chat_model):
    cfg = EvalConfig(tasks=["bpb", "arithmetic"], arithmetic_problems=3, pass_k=1, max_new_tokens=8)
    run_eval(cfg, {"m": tiny_chat_model}, EvalInputs(), tmp_path / "e")
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert list(data["models"]["m"]) == ["arithmetic_acc", "arithmetic_pass@1"] and "bpb" in data["left_out"]
    with pytest.raises(NanoforgeError, match="no task can run"):
        run_eval(EvalConfig(tasks=["bpb"]), {"m": tiny_chat_model}, EvalInputs(), tmp_path / "e2")
    with pytest.raises(NanoforgeError, match="unknown task"):
        run_eval(EvalConfig(tasks=["mmlu"]), {"m": tiny_chat_model}, EvalInputs(), tmp_path / "e3")


def test_pass_at_k_refuses_fewer_samples_than_k():
    for n, c, k in [(2, 1, 4), (3, 0, 4), (4, 5, 2), (4, 1, 0)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


def test_bpb_is_left_out_for_a_word_tokenizer(tmp_path, tiny_corpus):
    """Unknown words become <|unk|>, which stands for no bytes: bits per byte would leave them out of both the
    loss and the bytes, so the eval says why it has no figure rather than give a flattering one."""
    import torch

    from nanoforge.model import GPT, ModelConfig
    from nanoforge.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
    from nanoforge.tokens import TokenizeConfig, tokenize
    from nanoforge.train.checkpoint import save_model_artifact

    train_tokenizer(TokenizerConfig(kind="word", vocab_size=300), tiny_corpus, tmp_path / "tok")
    tokenize(TokenizeConfig(val_fraction=0.2, workers=1), tiny_corpus, tmp_path / "tok", tmp_path / "tokens")
    tok = Tokenizer.load(tmp_path / "tok")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, seq_len=32, n_layer=1, n_embd=16, n_head=2))
    save_model_artifact(model, tmp_path / "word", tokenizer_dir=tmp_path / "tok")
    run_eval(EvalConfig(tasks=["bpb"], eval_batches=1, batch_size=2), {"w": tmp_path / "word"},
             EvalInputs(tokens=tmp_path / "tokens"), tmp_path / "e")
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert data["models"]["w"] == {} and "<|unk|>" in data["left_out"]["bpb of w"]
    assert "(left out bpb of w: its word tokenizer" in eval_table(data)
