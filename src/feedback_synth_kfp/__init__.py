"""The Kubeflow Pipelines side of feedback-synth, as installed packages.

``feedback_synth_kfp.components`` and ``feedback_synth_kfp.pipelines`` are the repository's
top-level ``components/`` and ``pipelines/`` folders, mapped into the installed distribution by
``[tool.setuptools.package-dir]`` in pyproject.toml, so that ``feedback-synth compile`` works
where there is no repository checkout (in a container).
"""
