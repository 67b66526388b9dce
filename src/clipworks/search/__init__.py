"""Search: embedding collections into shards, and a FAISS vector index over them."""
