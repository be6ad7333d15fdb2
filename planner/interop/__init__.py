"""Other tools' files: axolotl / LLaMA-Factory / TRL configs read into plan options
(``trainer_configs``, ``trainer_sharding`` for their DeepSpeed / FSDP keys) and plans written back
as those configs (``export``). Imports only the core and ``options``."""
