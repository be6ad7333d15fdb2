"""What the model is: specs (config + module inventory read on the meta device), the GPU catalog,
Hub configs, LoRA parameter counts and the bytes of the (quantized) base weights. Imports only the
planner's core (errors, vocab, files, validate)."""
