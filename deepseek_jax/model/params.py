"""Parameter counting from shapes alone (`jax.eval_shape`: nothing is allocated).

  total   every parameter of the main model (embedding and head included, MTP excluded)
  active  what one token touches: total minus the routed experts it does not select,
          i.e. routed expert weights count X/E of their size
  mtp     parameters unique to the MTP modules (the shared embedding and head not counted again)
  embedding  the input embedding table (V·D), reported so that either convention can be used

For V3 these give 671.03B / 37.55B / 11.61B (spec §1.1: "671B", "37B", README "11.5B").
DeepSeek's reports count "activated" parameters two ways: V3's 37B includes the embedding table
and the head (our `active`), while V2's "2.4B" for V2-Lite matches `active − embedding`
(2.45B; with the embedding it is 2.66B).
The routing bias is state, not a parameter, and is not counted.
"""

from __future__ import annotations

import flax
import jax
import numpy as np

from deepseek_jax.config import ModelConfig

_ROUTED = ("w_gate", "w_up", "w_down")


def is_routed_expert(path: tuple[str, ...]) -> bool:
    """Routed expert weights sit directly under a `moe` module (the shared experts under moe/shared)."""
    return len(path) >= 2 and path[-2] == "moe" and path[-1] in _ROUTED


def count_params(config: ModelConfig) -> dict[str, int]:
    """{"total", "active", "mtp", "embedding"} parameter counts of `Transformer(config)`."""
    from deepseek_jax.model.transformer import init_variables  # avoids an import cycle
    shapes = jax.eval_shape(lambda: init_variables(jax.random.key(0), config, 1, 1))
    params = flax.traverse_util.flatten_dict(flax.core.meta.unbox(shapes["params"]))
    total = active = mtp = 0.0
    for path, leaf in params.items():
        n = int(np.prod(leaf.shape))
        if path[0] == "mtp":
            mtp += n
            continue
        total += n
        active += n * config.n_experts_per_token / config.n_routed_experts \
            if is_routed_expert(path) else n
    return {"total": int(total), "active": int(round(active)), "mtp": int(mtp),
            "embedding": config.vocab_size * config.d_model}
