"""The training step's memory: one pure function per term (``terms``), activations saved for
backward (``activations``, ``moe``), the moments of a step (``phases``), host memory (``host``),
Unsloth's terms (``unsloth``), sharding over ranks (``sharding``, ``per_rank``), and the profiles
that choose among them up front (``profiles``). Imports the core and ``planner.model``."""
