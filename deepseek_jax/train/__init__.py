"""Training: losses (LM, MTP, balance), the optimizer and V3's schedules, the pure train step, the
model's shardings and the sharded step (`sharded.py`), Orbax checkpoints, run directories,
metrics and FLOP counts."""
