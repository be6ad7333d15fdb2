"""qplan planner: exact LoRA parameter counts and a training-memory budget from a model config.

Nothing imported here (or by `qplan estimate` on a bundled model) may import torch.
"""

__version__ = "0.1.0"
