"""Data: the character tokenizer and built-in procedural text for demos and tests."""
