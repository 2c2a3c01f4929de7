"""Features every selection method reads: sentence embeddings and projected per-example LoRA
gradients, computed by Ray Data actors into a sharded, resumable feature store."""
