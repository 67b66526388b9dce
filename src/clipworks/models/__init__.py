"""Model towers and the CLIP model that joins them."""
