"""KFP pipelines of feedback-synth: ``feedback_synth_pipeline`` (compiled: feedback_synth_pipeline.yaml)."""
