"""Searches over plans: ``fit`` (batch, sequence, rank, targets, quantization, optimizer that fit a
GPU; suggestions for a plan that doesn't) and ``fewest_gpus`` (the fewest GPUs and the strategy).
Every candidate comes from the same memory model as ``qplan estimate``. Top of the planner."""
