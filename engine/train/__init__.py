"""Ray Train: LoRA / QLoRA adapters fitted on tasks (the anchor, the ensemble's members)."""
