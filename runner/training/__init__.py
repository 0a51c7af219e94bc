"""Training: the loop every trainer runs through (`loop`: steps, evaluation, the certificate,
checkpoints, divergence), checkpoints (`checkpoint`), the PEFT LoRA baselines (`baseline`) and
the worker-thread plumbing of the derived trainer's per-adapter updates (`runtime`)."""
