"""The stage bodies: one module per stage, named as its KFP component (``components/<name>.py``).

Each stage is a plain function that reads and writes fsspec URLs, takes one typed config and
returns a ``StageResult`` (``stages.result``); ``stages.resume.run_stage`` makes it resumable. The
stage table (``feedback_synth.orchestration.stage_table``) says how each is called; the in-process
runner, the CLI's stage verbs and the KFP components all call them through it.

    prepare_data -> train_baseline -> adapt_generator -> extract_feedback -> generate_shard
    -> filter_synthetic -> retrain -> evaluate -> promote

Heavy libraries (timm, diffusers, scikit-learn) are imported inside the function that needs them:
a KFP task imports only its own stage's, which keeps its start-up short.
"""
