"""The command line, ``feedback-synth``: a thin shell over the library (and feedback_synth_kfp for the KFP verbs)."""
from feedback_synth.cli.main import main

__all__ = ["main"]
