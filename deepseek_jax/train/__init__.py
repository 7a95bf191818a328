"""Training: losses (LM, MTP, balance), the optimizer, and the pure train step."""
