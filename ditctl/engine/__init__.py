"""The training engine: objective, loop, checkpoints, LoRA, and the one checkpoint loader."""
