"""The DeepSeek-V3 model: Multi-head Latent Attention, DeepSeekMoE and Multi-Token Prediction.

Dimension alphabet, used in einsum strings, shape comments and names everywhere in the project
(each letter means one thing only):

  B  batch                         T  query length            S  key / cache length
  D  model width (d_model)         V  vocabulary              N  attention heads
  H  q/k head dim without RoPE     R  RoPE head dim           U  value head dim
  Q  q-latent rank (q_lora_rank)   C  kv-latent rank          F  FFN / expert width
  E  routed experts                X  experts per token       G  expert groups
  L  stacked layers (nn.scan)      K  MTP depth               M  tokens routed to experts (B·T·X)
  W  rows one device sends another per expert-parallel round (dispatch.py)
  P  pipeline stages               I  layers per stage (L/P)  J  pipeline micro-batches

Files: `rope.py` (RoPE + YaRN), `layers.py` (RMSNorm, SwiGLU, parameter helper), `mla.py`,
`routing.py` (gate, loads, balancing, capacity, mesh layout), `dispatch.py` (dense, ragged,
local and expert-parallel dispatch), `moe.py` (the MoE layer), `blocks.py`, `mtp.py`,
`head.py` (output-head logits, whole or in chunks of positions), `transformer.py` (embedding,
stacks, head), `params.py` (counting), `zigzag.py` (the load-balanced sequence order of context
parallelism), `pipeline.py` (the pipeline schedule over stages).
"""

from deepseek_jax.model.params import count_params
from deepseek_jax.model.transformer import Transformer, init_variables

__all__ = ["Transformer", "count_params", "init_variables"]
