"""Chat templates, assistant masks and SFT packing (data/chat.py, data/sft.py).

The fixture folder holds a tokenizer_config.json with a DeepSeek-style Jinja template (bos, the
system text, <｜User｜>/<｜Assistant｜> turns, eos after each answer, earlier reasoning dropped
from history as R1's template does) and a one-token-per-character tokenizer.json (58 ids: the
special tokens as added tokens, lower-case letters, a few capitals, digits and punctuation, so
that it fits the 64-id HF fixture model), so every expected id sequence below is written out by
hand.
"""

import json
import os

import numpy as np
import pytest

from deepseek_jax.data import chat, sft
from deepseek_jax.data.encoding import Encoder

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat")
CONFIG = os.path.join(FIXTURES, "tokenizer_config.json")
TOKENIZER = os.path.join(FIXTURES, "tokenizer.json")
VOCAB = json.load(open(TOKENIZER))["model"]["vocab"]
BOS, EOS, USER, ASSISTANT = (VOCAB[t] for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                                 "<｜User｜>", "<｜Assistant｜>"))


def chars(text):
    return [VOCAB[c] for c in text]


def ids_and_mask(*pieces):
    """Concatenates (ids, trained?) pieces into the expected tokens and mask."""
    ids = [i for p, _ in pieces for i in p]
    mask = [float(on) for p, on in pieces for _ in p]
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


@pytest.fixture(scope="module")
def deepseek():
    return chat.ChatTemplate.from_tokenizer_config(CONFIG), Encoder(TOKENIZER)


def conversation(*turns, where="t.jsonl:1"):
    return chat.Conversation([{"role": r, "content": c} for r, c in turns], where)


def test_mask_covers_exactly_the_assistant_turns(deepseek):
    template, encoder = deepseek
    conv = conversation(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"),
                        ("user", "and 3+3?"), ("assistant", "6, as 3+3=6."))
    (sample,) = chat.tokenize_conversation(conv, template, encoder)
    tokens, mask = ids_and_mask(([BOS], 0), (chars("Be brief."), 0), ([USER], 0),
                                (chars("2+2?"), 0), ([ASSISTANT], 0), (chars("4") + [EOS], 1),
                                ([USER], 0), (chars("and 3+3?"), 0), ([ASSISTANT], 0),
                                (chars("6, as 3+3=6.") + [EOS], 1))
    np.testing.assert_array_equal(sample.tokens, tokens)
    np.testing.assert_array_equal(sample.mask, mask)


def test_a_template_that_rewrites_history_gives_one_sample_per_turn(deepseek):
    """R1-style: earlier reasoning is dropped from history, so each turn is trained in the
    context it is generated in, and only that turn counts."""
    template, encoder = deepseek
    conv = conversation(("user", "1+1?"), ("assistant", "<think>1+1=2</think>2"),
                        ("user", "2+2?"), ("assistant", "<think>ok</think>4"))
    first, second = chat.tokenize_conversation(conv, template, encoder)
    tokens, mask = ids_and_mask(([BOS, USER], 0), (chars("1+1?"), 0), ([ASSISTANT], 0),
                                (chars("<think>1+1=2</think>2") + [EOS], 1))
    np.testing.assert_array_equal(first.tokens, tokens)
    np.testing.assert_array_equal(first.mask, mask)
    tokens, mask = ids_and_mask(([BOS, USER], 0), (chars("1+1?"), 0), ([ASSISTANT], 0),
                                (chars("2") + [EOS], 0), ([USER], 0), (chars("2+2?"), 0),
                                ([ASSISTANT], 0), (chars("<think>ok</think>4") + [EOS], 1))
    np.testing.assert_array_equal(second.tokens, tokens)
    np.testing.assert_array_equal(second.mask, mask)


def test_byte_template_is_the_rl_prompt_plus_completion():
    """prompt/completion under the built-in byte template: bos + prompt + completion + eos, the
    row GRPO samples (`Encoder.encode_prompt` with bos, then the completion and eos)."""
    encoder = Encoder(None)
    prompt, completion = "What is 43+27? <think>", " 43+27=70 </think> <answer>70</answer>"
    conv = chat.Conversation(chat.to_messages({"prompt": prompt, "completion": completion},
                                              "x"), "x")
    (sample,) = chat.tokenize_conversation(conv, chat.BYTE_CHAT_TEMPLATE, encoder)
    rl_prompt = Encoder(None, add_bos=True).encode_prompt(prompt)
    expected = rl_prompt + list(encoder(completion))          # encoder(...) appends eos
    np.testing.assert_array_equal(sample.tokens, expected)
    np.testing.assert_array_equal(sample.mask, [0.0] * len(rl_prompt) +
                                  [1.0] * (len(expected) - len(rl_prompt)))
    # A system message is followed by a newline; non-ASCII text is one id per UTF-8 byte.
    conv = conversation(("system", "S"), ("user", "é"), ("assistant", "ok"))
    (sample,) = chat.tokenize_conversation(conv, chat.BYTE_CHAT_TEMPLATE, encoder)
    assert sample.tokens.tolist() == [0, ord("S") + 3, ord("\n") + 3, 0xC3 + 3, 0xA9 + 3,
                                      ord("o") + 3, ord("k") + 3, 1]
    assert sample.mask.tolist() == [0] * 5 + [1] * 3


def test_load_conversations_reads_both_forms(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "assistant", "content": "b"}]}) + "\n\n"
                    + json.dumps({"prompt": "a", "completion": "b", "extra": 1}) + "\n")
    one, two = chat.load_conversations(str(path))
    assert one.messages == two.messages == [{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "b"}]
    assert (one.where, two.where) == (f"{path}:1", f"{path}:3")


@pytest.mark.parametrize("line, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"prompt": "hi"}, "'messages' list or 'prompt' and 'completion'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 needs a 'role'"),
    ({"prompt": 1, "completion": "x"}, "must be strings"),
    ("{not json", "not valid JSON"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text(good + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
    with pytest.raises(chat.ChatError, match=match) as e:
        chat.load_conversations(str(path))
    assert f"{path}:2" in str(e.value)


def test_a_template_that_fails_names_the_template_and_the_line(deepseek, tmp_path):
    template, encoder = deepseek
    conv = conversation(("assistant", "hi"), ("user", "x"), where="data.jsonl:7")
    with pytest.raises(chat.ChatError, match="must start with a system or user") as e:
        chat.tokenize_conversation(conv, template, encoder)
    assert "data.jsonl:7" in str(e.value) and CONFIG in str(e.value)
    broken = tmp_path / "tokenizer_config.json"
    broken.write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}"}))
    with pytest.raises(chat.ChatError, match="failed to render") as e:
        chat.tokenize_conversation(conv, chat.ChatTemplate.from_tokenizer_config(str(broken)),
                                   encoder)
    assert str(broken) in str(e.value) and "data.jsonl:7" in str(e.value)
    broken.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(chat.ChatError, match="no chat_template"):
        chat.ChatTemplate.from_tokenizer_config(str(broken))


def test_default_template_choice(tmp_path):
    assert chat.default_template("") is chat.BYTE_CHAT_TEMPLATE
    assert chat.default_template(TOKENIZER).origin == CONFIG
    with pytest.raises(chat.ChatError, match="data.chat_template"):
        chat.default_template(str(tmp_path / "tokenizer.json"))


def test_hf_datasets_source_needs_the_package():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install datasets"):
        chat.load_hf_dataset("some/dataset")


def sample(n, start, where="s"):
    """A sample of n tokens start, start+1, … whose second half is trained."""
    mask = np.zeros(n, np.float32)
    mask[n // 2:] = 1
    return chat.Sample(np.arange(start, start + n, dtype=np.int32), mask, where)


def test_packing_keeps_samples_whole_and_the_mask_in_valid():
    samples = [sample(4, 10), sample(3, 20), sample(5, 30), sample(9, 40)]
    rows = sft.pack_samples(samples, seq_len=8, pad_id=2)
    a = rows.arrays
    np.testing.assert_array_equal(a["tokens"], [[10, 11, 12, 13, 20, 21, 22, 2],
                                                [30, 31, 32, 33, 34, 2, 2, 2],
                                                [40, 41, 42, 43, 44, 45, 46, 47]])
    np.testing.assert_array_equal(a["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 0],
                                                     [1, 1, 1, 1, 1, 0, 0, 0],
                                                     [1] * 8])
    np.testing.assert_array_equal(a["positions"], [[0, 1, 2, 3, 0, 1, 2, 0],
                                                   [0, 1, 2, 3, 4, 0, 0, 0],
                                                   list(range(8))])
    # Trained targets: the mask, minus each sample's first token (nothing before it to predict
    # from) and padding.
    np.testing.assert_array_equal(a["valid"], [[0, 0, 1, 1, 0, 1, 1, 0],
                                               [0, 0, 1, 1, 1, 0, 0, 0],
                                               [0, 0, 0, 0, 1, 1, 1, 1]])
    assert (rows.truncated, rows.samples, sft.trained_tokens(a)) == (1, 4, 11)
    one = sft.pack_samples(samples, seq_len=8, pad_id=2, pack=False).arrays
    assert one["tokens"].shape == (4, 8) and sft.trained_tokens(one) == 11
    np.testing.assert_array_equal(one["tokens"][1], [20, 21, 22, 2, 2, 2, 2, 2])


def test_batches_are_a_function_of_the_step():
    rows = sft.pack_samples([sample(4, 10 * i) for i in range(5)], seq_len=4, pad_id=2)
    batches = sft.SFTBatches(rows, global_batch=2, seed=3)
    # Five rows, two a step: steps 0–1 and the first row of step 2 are epoch 0, a permutation.
    first = np.concatenate([batches.indices(s) for s in range(3)])[:5]
    assert sorted(first.tolist()) == list(range(5))
    again = sft.SFTBatches(rows, global_batch=2, seed=3)
    np.testing.assert_array_equal(again.batch(7)["tokens"], batches.batch(7)["tokens"])
    halves = [sft.SFTBatches(rows, 2, 3, process_index=p, process_count=2).batch(7)["tokens"]
              for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), batches.batch(7)["tokens"])
    held = sft.eval_batches(rows, global_batch=2)
    assert len(held) == 3 and held[-1]["segment_ids"][1].sum() == 0
    assert sum(sft.trained_tokens(b) for b in held) == sft.trained_tokens(rows.arrays)


def test_held_out_split_keeps_conversations_whole():
    convs = [conversation(("user", str(i)), ("assistant", "x")) for i in range(20)]
    train, held = sft.split_held_out(convs, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18
    assert {c.messages[0]["content"] for c in train + held} == {str(i) for i in range(20)}
    with pytest.raises(ValueError, match="validation_fraction"):
        sft.split_held_out(convs, 0.0, seed=0)
