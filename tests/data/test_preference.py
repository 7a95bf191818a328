"""Preference pairs to DPO rows (data/preference.py): the three record forms, the response
mask, truncation, batching, and the errors a bad file gets."""

import json

import numpy as np
import pytest

from deepseek_jax.data import chat, preference
from deepseek_jax.data import tokenizer as byte_tokenizer
from deepseek_jax.data.encoding import Encoder

ENCODER = Encoder(None)
TEMPLATE = chat.BYTE_CHAT_TEMPLATE
BOS, EOS = byte_tokenizer.BOS, byte_tokenizer.EOS
B = lambda text: list(byte_tokenizer.encode(text))      # noqa: E731 (ids of text's bytes)


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return str(path)


def _targets(rows, r, side):
    """The bytes the mask scores on one side (position i scores token i + 1)."""
    tokens, mask = rows.arrays["tokens"][r, side], rows.arrays["mask"][r, side]
    return [int(tokens[i + 1]) for i in np.flatnonzero(mask)]


def test_the_three_forms_render_prompt_then_response(tmp_path):
    user = [{"role": "user", "content": "2+2="}]
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}], "score": 1},
        {"chosen": user + [{"role": "assistant", "content": "4"}],
         "rejected": user + [{"role": "assistant", "content": "5"}]},
        {"prompt": "2+2=", "chosen": user + [{"role": "assistant", "content": "4"}],
         "rejected": user + [{"role": "assistant", "content": "5"}]},    # UltraFeedback's form
    ])
    pairs = preference.load_pairs(path)
    assert len({(json.dumps(p.prompt), json.dumps(p.chosen), json.dumps(p.rejected))
                for p in pairs}) == 1
    rows = preference.pair_rows(pairs, TEMPLATE, ENCODER, seq_len=12)
    assert rows.arrays["tokens"].shape == (4, 2, 12) and rows.dropped == rows.truncated == 0
    for r in range(4):
        for side, answer in ((0, "4"), (1, "5")):
            text = [BOS, *B("2+2=" + answer), EOS]
            np.testing.assert_array_equal(rows.arrays["tokens"][r, side, :len(text)], text)
            assert (rows.arrays["tokens"][r, side, len(text):] == ENCODER.pad_id).all()
            np.testing.assert_array_equal(rows.arrays["token_mask"][r, side],
                                          np.arange(12) < len(text))
            # The response and its eos are the targets; the prompt and padding are not.
            assert _targets(rows, r, side) == [*B(answer), EOS]


def test_only_the_last_assistant_turn_is_trained():
    """Earlier assistant turns in the prompt are context, not targets."""
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bb"},
              {"role": "user", "content": "c"}]
    pair = preference.Pair(prompt, [{"role": "assistant", "content": "dd"}],
                           [{"role": "assistant", "content": "e"}], "x")
    rows = preference.pair_rows([pair], TEMPLATE, ENCODER, seq_len=16)
    assert _targets(rows, 0, 0) == [*B("dd"), EOS]
    assert _targets(rows, 0, 1) == [*B("e"), EOS]


def test_long_sides_are_cut_and_pairs_without_a_response_dropped():
    pairs = [preference.to_pair({"prompt": "x" * 4, "chosen": "y" * 6, "rejected": "z"}, "a"),
             preference.to_pair({"prompt": "x" * 9, "chosen": "y", "rejected": "z"}, "b")]
    rows = preference.pair_rows(pairs, TEMPLATE, ENCODER, seq_len=8)
    # Pair a: bos + 4 + 6 + eos = 12 > 8, cut to 8: the targets are the 3 y's that fit. Pair b:
    # its prompt alone fills the row, so it is dropped.
    assert (len(rows), rows.truncated, rows.dropped) == (1, 3, 1)
    assert _targets(rows, 0, 0) == [*B("yyy")] and _targets(rows, 0, 1) == [*B("z"), EOS]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "chosen": "b"}, "needs 'chosen' and 'rejected'"),
    ([1, 2], "needs 'chosen' and 'rejected'"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
    ({"prompt": "a", "chosen": [{"role": "bot", "content": "x"}], "rejected": "b"},
     "'chosen' message 0 needs a 'role'"),
    ({"prompt": "a", "chosen": "b", "rejected": [{"role": "user", "content": "x"}]},
     "'rejected' response must end with an assistant message"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "c"}]},
     "differ only in their last message"),
    ({"prompt": "a", "chosen": [{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b"}], "rejected": "c"},
     "differ only in their last message"),
    ({"chosen": [{"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, "the prompt is empty"),
])
def test_bad_records_name_the_file_and_line(tmp_path, record, message):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, record])
    with pytest.raises(chat.ChatError, match=f"{path}:2: .*{message}"):
        preference.load_pairs(path)
    bad_json = _write(tmp_path / "j.jsonl", ["{not json"])
    with pytest.raises(chat.ChatError, match=f"{bad_json}:1: not valid JSON"):
        preference.load_pairs(bad_json)


def test_batches_are_a_function_of_the_step_and_eval_pads_with_empty_pairs():
    pairs = [preference.to_pair({"prompt": f"{i}?", "chosen": "y", "rejected": "n"}, str(i))
             for i in range(10)]
    rows = preference.pair_rows(pairs, TEMPLATE, ENCODER, seq_len=8)
    batches = preference.pair_batches(rows, 4, seed=3)
    seen = np.concatenate([batches.indices(s) for s in range(5)])     # two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    again = preference.pair_batches(rows, 4, seed=3).batch(3)
    for k, v in batches.batch(3).items():
        np.testing.assert_array_equal(v, again[k])
        assert v.shape[0] == 4
    evals = preference.eval_batches(rows, 4)
    assert [len(b["tokens"]) for b in evals] == [4, 4, 4]
    last = evals[-1]
    assert not last["mask"][2:].any() and not last["token_mask"][2:].any()
    assert (last["tokens"][2:] == ENCODER.pad_id).all()
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in evals])[:10],
                                  rows.arrays["tokens"])


def test_under_a_template_that_rewrites_history_the_last_turn_is_scored():
    """The DeepSeek-R1-style fixture template drops earlier reasoning from the history: each
    side is the prompt as the model sees it when answering, plus its own last turn."""
    from test_chat import ASSISTANT, BOS, CONFIG, EOS, TOKENIZER, USER, chars, ids_and_mask
    template, encoder = chat.ChatTemplate.from_tokenizer_config(CONFIG), Encoder(TOKENIZER)
    prompt = [{"role": "user", "content": "1+1?"},
              {"role": "assistant", "content": "<think>1+1=2</think>2"},
              {"role": "user", "content": "2+2?"}]
    pair = preference.to_pair({"prompt": prompt, "chosen": "<think>ok</think>4",
                               "rejected": "5"}, "x")
    rows = preference.pair_rows([pair], template, encoder, seq_len=48)
    for side, answer in ((0, "<think>ok</think>4"), (1, "5")):
        tokens, mask = ids_and_mask(([BOS, USER], 0), (chars("1+1?"), 0), ([ASSISTANT], 0),
                                    (chars("2") + [EOS], 0), ([USER], 0), (chars("2+2?"), 0),
                                    ([ASSISTANT], 0), (chars(answer) + [EOS], 1))
        n = len(tokens)
        np.testing.assert_array_equal(rows.arrays["tokens"][0, side, :n], tokens)
        np.testing.assert_array_equal(rows.arrays["mask"][0, side, : n - 1], mask[1:])
        assert not rows.arrays["mask"][0, side, n - 1:].any()
