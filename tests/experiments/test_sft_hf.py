"""SFT from an HF-imported checkpoint, through the model's own tokenizer and chat template."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.configs.sft import get_config
from deepseek_jax.data import sft
from deepseek_jax.data.encoding import Encoder
from deepseek_jax.hf import convert_to_orbax, load_hf_checkpoint
from deepseek_jax.model import Transformer
from deepseek_jax.train import losses
from deepseek_jax.train.checkpoint import load_model_config, load_trained
from deepseek_jax.trainers import sft as sft_trainer

HERE = os.path.dirname(__file__)
HF = os.path.join(HERE, "..", "hf", "fixtures", "v3")
# tokenizer.json with its tokenizer_config.json (a DeepSeek-style chat template) beside it
TOKENIZER = os.path.join(HERE, "..", "data", "fixtures", "chat", "tokenizer.json")


def _conversations(path, n=24):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(x) for x in rng.integers(10, 99, 2))
            turns = [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": f"what is {a}+{b}?"},
                     {"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think>{a + b}"}]
            if i % 2:     # a second turn: the template drops the first turn's reasoning
                turns += [{"role": "user", "content": "and doubled?"},
                          {"role": "assistant", "content": f"{2 * (a + b)}"}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return str(path)


def test_sft_from_an_hf_imported_checkpoint(tmp_path):
    converted = str(tmp_path / "v3_orbax")
    convert_to_orbax(HF, converted, preset="fsdp", mesh_config={"fsdp": 8}, dtype=jnp.float32)
    c = get_config("tiny")
    c.init.pretrain_dir = converted
    c.data.tokenizer = TOKENIZER
    c.data.path = _conversations(tmp_path / "conv.jsonl")
    c.data.validation_fraction = 0.25
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 2, 2, 2
    c.train.bias_update_rate = 0.0
    result = sft_trainer.train_and_evaluate(c, str(tmp_path / "run"))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "lm_loss" in r] == [1, 2]
    assert all(np.isfinite(r["lm_loss"]) for r in rows if "lm_loss" in r)

    # The starting held-out loss, independently: the HF weights as loaded, whole logits, the LM
    # loss on the packed held-out rows (assistant tokens only, through `valid`).
    model_config = load_model_config(converted)
    _, variables = load_hf_checkpoint(HF, dtype=jnp.float32)
    _, held = sft.rows_from_config(c.data, Encoder(TOKENIZER))
    b = held.arrays
    logits = Transformer(model_config).apply(variables, b["tokens"], positions=b["positions"],
                                             segment_ids=b["segment_ids"])[0]
    expected = float(losses.lm_loss(logits, b["tokens"], b["valid"]))
    # The imported config computes in bf16 (u = 2^-8): the trainer's sharded, chunked-head
    # program and this one round activations differently, ~u relative per logit; the mean over
    # the held-out tokens keeps that size, so 2·u bounds it.
    np.testing.assert_allclose(result["before"]["lm_loss"], expected, rtol=2 * 2.0 ** -8)

    # Two Adam steps at lr ≤ 3e-3 move each weight by at most ~2·lr.
    _, start = load_trained(converted)
    _, trained = load_trained(str(tmp_path / "run"))
    assert jax.tree.structure(start["params"]) == jax.tree.structure(trained["params"])
    moved = [np.abs(np.asarray(a) - np.asarray(t)).max()
             for a, t in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(trained["params"]))]
    assert max(moved) < 1e-2 and max(moved) > 0
