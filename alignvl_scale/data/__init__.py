"""Shards in, batches out: formats (samples), writing (shards), training reader (reader),
eval sets (evalsets), validation (check). See docs/data.md."""
