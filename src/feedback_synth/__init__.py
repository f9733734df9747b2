"""feedback-synth: fix imbalanced image classifiers with feedback-guided diffusion synthesis."""
__version__ = "0.1.0"
