"""The DeepSeek-V3 model: Multi-head Latent Attention, DeepSeekMoE and Multi-Token Prediction.

Dimension alphabet, used in einsum strings, shape comments and names everywhere in the project
(each letter means one thing only):

  B  batch                         T  query length            S  key / cache length
  D  model width (d_model)         V  vocabulary              N  attention heads
  H  q/k head dim without RoPE     R  RoPE head dim           U  value head dim
  Q  q-latent rank (q_lora_rank)   C  kv-latent rank          F  FFN / expert width
  E  routed experts                X  experts per token       G  expert groups
  L  stacked layers (nn.scan)      K  MTP depth               M  tokens routed to experts (B·T·X)

Files: `rope.py` (RoPE + YaRN), `layers.py` (RMSNorm, SwiGLU, parameter helper), `mla.py`,
`moe.py` (gate, dispatch, balancing), `mtp.py`, `transformer.py` (blocks, embedding, head),
`params.py` (counting).
"""

from deepseek_jax.model.params import count_params
from deepseek_jax.model.transformer import Transformer, init_variables

__all__ = ["Transformer", "count_params", "init_variables"]
