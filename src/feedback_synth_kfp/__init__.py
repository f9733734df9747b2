"""The Kubeflow Pipelines side of feedback-synth: the components, the pipeline and their glue.

``feedback_synth_kfp.components`` and ``feedback_synth_kfp.pipelines`` are the repository's
top-level ``components/`` and ``pipelines/`` folders, mapped into the installed distribution by
``[tool.setuptools.package-dir]`` in pyproject.toml, so that ``feedback-synth compile`` works
where there is no repository checkout (in a container). Beside them: ``parameters`` (run config
<-> pipeline parameters), ``artifacts`` (where a task writes, what its artifacts record),
``tracking`` (MLflow runs of KFP tasks, the exit handler), ``local_runner`` (``run --runner
kfp-local``), ``submit`` and ``cli`` (``compile`` and ``submit``). The library never imports any of it.
"""

from feedback_synth_kfp.launcher import watch_launcher as _watch_launcher

# inside a kfp-local task process only (the launcher sets the variable): end with the launcher
_watch_launcher()
