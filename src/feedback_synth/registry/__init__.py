"""The model registry: the champion/challenger gate, the promotion locks, registering and promoting."""
