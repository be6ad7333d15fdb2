"""qplan backends: trainers that run a plan for real and measure it (loaded lazily by name)."""
