"""Bundled data: one JSON per model (config + module inventory) and one per GPU (gpus/)."""
