"""Grain pipeline: determinism, sharding, epochs, checkpoint/restore, eval, HF tokenizer, errors."""

import json
import re
import pickle

import grain
import numpy as np
import pytest

from deepseek_jax.data import encoding, pipeline, tokenizer
from deepseek_jax.data.run_config import vocab_size as data_vocab_size
from deepseek_jax.data.packing import FEATURES

DOCS = [f"doc {i}: " + "ab" * (i % 5) for i in range(20)]
ONE = grain.sharding.ShardOptions(shard_index=0, shard_count=1, drop_remainder=True)


def train(docs=DOCS, **kw):
    args = dict(seq_len=16, global_batch_size=2, seed=0, shard_options=ONE, read_threads=0)
    return pipeline.make_train_iterator(docs, **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(FEATURES)
        for k in FEATURES:
            np.testing.assert_array_equal(x[k], y[k])


def documents_in(batches, eos=tokenizer.EOS):
    """The texts the batches hold, in order: real tokens concatenated, cut at eos."""
    rows = [row for b in batches for row in zip(b["tokens"], b["segment_ids"])]
    stream = np.concatenate([t[s > 0] for t, s in rows])
    cuts = np.flatnonzero(stream == eos)
    pieces = np.split(stream, cuts + 1)
    assert len(pieces[-1]) == 0                                   # ends on a whole document
    return [tokenizer.decode(p[:-1]) for p in pieces[:-1]]


def test_batches_have_the_documented_layout():
    b = next(train(global_batch_size=4))
    assert set(b) == set(FEATURES)
    for k in ("tokens", "segment_ids", "positions"):
        assert b[k].shape == (4, 16) and b[k].dtype == np.int32
    assert b["valid"].shape == (4, 16) and b["valid"].dtype == np.float32
    seg = b["segment_ids"]
    prev = np.concatenate([np.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
    np.testing.assert_array_equal(b["valid"], ((seg > 0) & (seg == prev)).astype(np.float32))


def test_same_seed_same_batches_and_seed_matters():
    assert_same(take(train(seed=5), 6), take(train(seed=5), 6))
    a, b = take(train(seed=5), 3), take(train(seed=6), 3)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))


def test_epochs_cover_every_document_in_a_new_order():
    batches = list(train(num_epochs=2, global_batch_size=1))     # batch 1: no row is dropped
    docs = documents_in(batches)
    assert sorted(docs[:20]) == sorted(DOCS) and sorted(docs[20:]) == sorted(DOCS)
    assert docs[:20] != docs[20:] and docs[:20] != DOCS


def test_two_processes_read_disjoint_shards_covering_everything():
    seen = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        # global batch 2 over 2 processes: 1 row per process per step, so no row is dropped.
        seen.append(documents_in(list(train(num_epochs=1, shard_options=shard))))
    assert len(seen[0]) == len(seen[1]) == 10
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(DOCS)


def test_default_sharding_follows_jax_processes():
    """One JAX process here: the default shard is the whole dataset."""
    assert_same(take(train(shard_options=None), 4), take(train(), 4))


def test_restored_iterator_continues_exactly():
    for k in (0, 1, 4, 7):                                       # several mid-document cuts
        it = train()
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))           # survives JSON, as in Orbax
        expected = take(it, 5)
        resumed = train()
        resumed.set_state(state)
        assert_same(take(resumed, 5), expected)


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = train()
    take(it, 3)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = take(it, 4)
    resumed = train()
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert_same(take(resumed, 4), expected)


def test_worker_processes_give_the_same_batches_and_restore():
    it = train(worker_count=1, read_threads=1)
    first = take(it, 3)
    state = it.get_state()
    rest = take(it, 2)
    assert_same(first + rest, take(train(), 5))
    resumed = train(worker_count=1, read_threads=1)
    resumed.set_state(state)
    assert_same(take(resumed, 2), rest)


def test_eval_iterator_is_finite_ordered_and_padded():
    # DOCS hold 250 tokens: 16 rows of 16, so the 6th batch of 3 has 2 padding rows.
    batches = list(pipeline.make_eval_iterator(DOCS, seq_len=16, global_batch_size=3,
                                               shard_options=ONE))
    assert len(batches) == 6
    assert documents_in(batches) == DOCS                          # source order, each once
    assert all(b["tokens"].shape == (3, 16) for b in batches)
    last = batches[-1]
    empty = last["segment_ids"].sum(axis=1) == 0
    assert empty.any()                                            # padded to the batch size
    assert np.all(last["valid"][empty] == 0) and np.all(last["tokens"][empty] == tokenizer.PAD)
    again = list(pipeline.make_eval_iterator(DOCS, seq_len=16, global_batch_size=3,
                                             shard_options=ONE))
    assert_same(again, batches)
    fixed = list(pipeline.make_eval_iterator(DOCS, seq_len=16, global_batch_size=3,
                                             shard_options=ONE, num_batches=len(batches) + 2))
    assert len(fixed) == len(batches) + 2 and fixed[-1]["valid"].sum() == 0
    short = list(pipeline.make_eval_iterator(DOCS, seq_len=16, global_batch_size=3,
                                             shard_options=ONE, num_batches=1))
    assert_same(short, batches[:1])


def test_eval_shards_cover_an_odd_split_exactly_once():
    docs = DOCS[:7]
    seen = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
        seen += documents_in(list(pipeline.make_eval_iterator(
            docs, seq_len=8, global_batch_size=2, shard_options=shard)))
    assert seen == docs


def test_dict_elements_and_text_field():
    records = [{"body": d.encode()} for d in DOCS]
    assert_same(take(train(records, text_field="body"), 3), take(train(), 3))
    with pytest.raises(ValueError, match="text_field"):
        next(train(records))


@pytest.fixture(scope="module")
def hf_tokenizer_path(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>",
                                                                   "<pad>"])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran far"], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path), tok


def test_hf_tokenizer_json(hf_tokenizer_path):
    path, tok = hf_tokenizer_path
    enc = encoding.Encoder(path)
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    assert (enc.eos_id, enc.pad_id, enc.vocab_size) == (eos, pad, tok.get_vocab_size())
    text = "the cat ran"
    np.testing.assert_array_equal(enc(text), tok.encode(text).ids + [eos])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(enc))(text), enc(text))
    with_bos = encoding.Encoder(path, add_bos=True)
    assert with_bos(text)[0] == tok.token_to_id("<s>")

    docs = ["the cat sat", "a dog ran far", "the mat"] * 3
    b = next(train(docs, tokenizer_path=path, seq_len=8))
    stream = np.concatenate([t[s > 0] for t, s in zip(b["tokens"], b["segment_ids"])])
    pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)
    encoded = {tuple(enc(d).tolist()) for d in docs}
    assert len(pieces) > 2 and all(tuple(p.tolist()) in encoded for p in pieces[:-1])
    assert np.all(b["tokens"][b["segment_ids"] == 0] == pad)
    assert data_vocab_size(path) == tok.get_vocab_size()
    with pytest.raises(ValueError, match="eos_token="):
        encoding.Encoder(path, eos_token="<|nope|>")


def test_byte_tokenizer_takes_any_text():
    """Non-ASCII text becomes UTF-8 byte ids and decodes back."""
    from deepseek_jax.data import tokenizer
    batch = next(train(["caf\u00e9 \u4e2d"] * 4))
    row = batch["tokens"][0][batch["segment_ids"][0] == 1]
    assert tokenizer.decode(row) == "caf\u00e9 \u4e2d"


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=1), "seq_len >= 2"),
    (dict(global_batch_size=3, shard_options=grain.sharding.ShardOptions(0, 2)),
     "multiple of 2"),
    (dict(seed=-1), "seed"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(tokenizer=encoding.Encoder(), tokenizer_path="x.json"), "not both"),
])
def test_bad_arguments_say_what_to_change(kw, match):
    with pytest.raises(ValueError, match=match):
        train(**kw)


def test_bad_sources_say_what_to_change():
    with pytest.raises(ValueError, match="empty"):
        train([])
    with pytest.raises(ValueError, match="random access"):
        train(iter(DOCS))
    with pytest.raises(ValueError, match="fewer processes"):
        train(DOCS[:1], shard_options=grain.sharding.ShardOptions(0, 2, drop_remainder=True))
    with pytest.raises(ValueError, match="tokenizer.json"):
        encoding.Encoder("/nonexistent/tokenizer.json")


def test_run_config_call_form(tmp_path):
    ml_collections = pytest.importorskip("ml_collections")
    pytest.importorskip("tensorflow_datasets")
    from deepseek_jax import data
    cfg = ml_collections.ConfigDict(dict(
        dataset="countdown", data_dir="", num_train=30, num_eval=6, text_glob="",
        text_field="text", tokenizer="", seq_len=24, global_batch=2, shuffle_seed=4))
    it = data.train_iterator(cfg, str(tmp_path), seed=None, shard_options=ONE, read_threads=0)
    first = take(it, 2)
    assert first[0]["tokens"].shape == (2, 24)
    again = data.train_iterator(cfg, str(tmp_path), shard_options=ONE, read_threads=0)
    again.set_state(json.loads(json.dumps(it.get_state())))
    assert_same(take(again, 2), take(it, 2))
    evals = list(data.eval_iterator(cfg, str(tmp_path), shard_options=ONE, num_batches=3))
    assert len(evals) == 3 and evals[0]["valid"].sum() > 0
    texts = tokenizer.decode(evals[0]["tokens"][0], stop_at_eos=False)
    assert texts.startswith("numbers ")
    assert data.vocab_size("") == tokenizer.VOCAB_SIZE
    with pytest.raises(TypeError, match="seq_len"):       # the config sets it
        data.train_iterator(cfg, str(tmp_path), seq_len=8)
    with pytest.raises(ValueError, match="text_glob"):
        data.train_iterator(ml_collections.ConfigDict({**cfg.to_dict(),
                                                       "dataset": "text_files"}), tmp_path)
    with pytest.raises(TypeError, match="seq_len"):       # a source needs its sizes
        pipeline.make_train_iterator(DOCS)


def _r1_arithmetic(**shares):
    """A `data` config: 400 two-digit ± training problems in the compact R1 format."""
    ml_collections = pytest.importorskip("ml_collections")
    return ml_collections.ConfigDict(dict(
        dataset="arithmetic", num_train=400, num_eval=10, max_digits=2, min_digits=2, ops="+-",
        template="compact", **shares))


def test_r1_documents_mix_plain_lines_and_worked_solutions(tmp_path):
    from deepseek_jax.data import run_config
    cfg = _r1_arithmetic(plain_fraction=0.5, worked_fraction=0.5)
    docs = run_config._source(cfg, str(tmp_path), "train")
    texts = [docs[i] for i in range(len(docs))]
    plain = [t for t in texts if not t.startswith("What is")]
    assert all(re.fullmatch(r"\d+[+-]\d+=-?\d+\n", t) for t in plain)
    r1 = [t for t in texts if t.startswith("What is")]
    # An equation think block is one word ("43+27=70"); a worked one has a step per column.
    worked = [t for t in r1 if len(t.split("<think>")[1].split("</think>")[0].split()) > 1]
    # Two independent fixed-hash halves: ~1/2 plain, ~1/4 worked (sd ≈ 0.025 and 0.02 here).
    assert abs(len(plain) / len(texts) - 0.5) < 0.1
    assert abs(len(worked) / len(texts) - 0.25) < 0.08
    with pytest.raises(ValueError, match="plain_fraction"):
        run_config._source(_r1_arithmetic(plain_fraction=1.5), str(tmp_path), "train")


def test_r1_documents_with_estimates(tmp_path):
    from deepseek_jax.data import run_config
    from deepseek_jax.data import r1
    from deepseek_jax.rl import rewards
    cfg = _r1_arithmetic(estimate_fraction=0.75)
    docs = run_config._source(cfg, str(tmp_path), "train")
    source = run_config.task_source(cfg, str(tmp_path), "train")
    estimated = 0
    for i in range(len(docs)):
        problem, text = r1.problem_from_record(source[i]), docs[i]
        a, b = problem["numbers"]
        if " about " in text:
            estimated += 1
            rough = (a + 5) // 10 * 10, (b + 5) // 10 * 10
            value = rough[0] + rough[1] if problem["op"] == "+" else rough[0] - rough[1]
            assert text.endswith(f"<think> about {value} </think> <answer>{value}</answer>"), text
        else:   # exact work, and its answer scores 1
            assert rewards.accuracy_reward(text, problem) == 1.0, text
    assert abs(estimated / len(docs) - 0.75) < 0.08            # sd ≈ 0.02 over 400
    with pytest.raises(ValueError, match="estimate_fraction"):
        run_config._source(_r1_arithmetic(estimate_fraction=-1), str(tmp_path), "train")


def test_sharded_train_iterator_states_cover_every_shard_and_move_between_counts():
    """One process reading 2 shards stacks their batches; its state names each shard, so a run
    reading another shard count either switches to the checkpoint's (data.shards=0) or says
    which count to set (a fixed data.shards)."""
    import json as json_lib

    from deepseek_jax.data.run_config import ShardedTrainIterator

    def make(index, count):
        options = grain.sharding.ShardOptions(index, count, drop_remainder=True)
        return train(global_batch_size=4, shard_options=options)

    it = ShardedTrainIterator(make, 2, fixed=True)
    assert it.shards == [0, 1]
    first = next(it)["tokens"]
    np.testing.assert_array_equal(first[:2], next(make(0, 2))["tokens"])
    np.testing.assert_array_equal(first[2:], next(make(1, 2))["tokens"])
    state = json_lib.loads(json_lib.dumps(it.merge_states([it.get_state()])))
    assert state["shard_count"] == 2 and sorted(state["shards"]) == ["0", "1"]
    want = next(it)["tokens"]
    resumed = ShardedTrainIterator(make, 2, fixed=True)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], want)

    other = ShardedTrainIterator(make, 1, fixed=True)
    with pytest.raises(ValueError, match="set data.shards=2"):
        other.set_state(state)
    auto = ShardedTrainIterator(make, 1, fixed=False)
    auto.set_state(state)
    assert auto.shard_count == 2
    np.testing.assert_array_equal(next(auto)["tokens"], want)
