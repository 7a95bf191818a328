"""GRPO with verifiable rewards: prompts and rewards (rewards.py), group-relative advantages
(advantages.py), the clipped policy loss with a KL penalty (loss.py). The loop that samples,
scores and updates is `trainers/grpo.py`. Also DPO's loss and step over preference pairs
(dpo.py; its loop is `trainers/dpo.py`) and rejection sampling (rejection.py)."""
