"""GRPO with verifiable rewards: prompts and rewards (rewards.py), group-relative advantages
(advantages.py), the clipped policy loss with a KL penalty (loss.py). The loop that samples,
scores and updates is `experiments/grpo.py`."""
