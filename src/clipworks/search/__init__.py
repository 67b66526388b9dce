"""Search: embedding collections into shards (`embed`, `store`), a FAISS vector index over them (`index`, `ann`),
and near-duplicate pairs (`dedup`). The `clipworks embed | index | dedup` commands live in `commands`."""
