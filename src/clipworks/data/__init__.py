"""Data: safe image decoding (datasets arrive with training)."""
