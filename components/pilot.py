"""The pilot's components (feedback_synth_kfp.pilot; the in-process pilot: feedback_synth.orchestration.tune).

One component per kind of pilot task: the folds, a fold's models (its baseline and adaptations),
the fan-in that waits for every fold, one (setting, fold) cell, the verdict, and the chosen config
as the run pipeline's parameter.
"""
from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Output

from . import CPU_IMAGE, GPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pilot_prepare(tracking: Input[Artifact], output: str, grid: str, folds: int, epochs: int) -> list:
    """Prepare the dataset and write its folds of train + val (the test split is never read);
    returns the fold numbers.

    Args:
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        output (str): where the pilot writes (a URL every task reaches, e.g. gs://bucket/pilot/p1).
        grid (str): JSON object of the settings to try, {"section.field": [values]}; '' = the default grid.
        folds (int): repeated validation splits of train + val.
        epochs (int): epochs of the pilot's trainings; 0 = the run's.
    """
    from feedback_synth_kfp.pilot import prepare

    return prepare(tracking, output, grid, folds, epochs)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pilot_fold(tracking: Input[Artifact], output: str, fold: int, grid: str, epochs: int) -> str:
    """Train one fold's baseline, then each generator adaptation the grid asks for, once (their
    folders under ``output``); returns the baseline's folder."""
    from feedback_synth_kfp.pilot import fold_models

    return fold_models(tracking, output, fold, grid, epochs)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pilot_cells(grid: str, baselines: list) -> list:
    """Wait for every fold's models (``baselines``, collected), then return the cells: one per
    setting of ``grid`` and fold."""
    from feedback_synth_kfp.pilot import cells_of

    return cells_of(grid, len(baselines))


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pilot_cell(tracking: Input[Artifact], output: str, cell: dict, epochs: int) -> dict:
    """One setting on one fold: adapt (if asked), generate, filter, retrain; its validation scores
    with and without synthesis (a nested MLflow run)."""
    from feedback_synth_kfp.pilot import cell as score

    return score(tracking, output, cell, epochs)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pilot_choose(tracking: Input[Artifact], output: str, grid: str, folds: int, epochs: int, scores: list,
                 verdict: Output[Markdown], chosen: Output[Artifact]) -> bool:
    """The verdict: per setting the mean gain over no synthesis and its CI, go only when the CI
    excludes zero; the chosen run config (``chosen.yaml``). Returns go (True) or no-go.

    Args:
        verdict (Output[Markdown]): the validation table and the verdict in words (the KFP UI shows it).
        chosen (Output[Artifact]): the chosen run config (YAML): ``feedback-synth submit --config`` it.
    """
    from feedback_synth import storage
    from feedback_synth.orchestration.tune import validation_table
    from feedback_synth_kfp.pilot import choose

    report = choose(tracking, output, grid, folds, epochs, scores)
    with open(verdict.path, "w") as f:
        f.write(validation_table(report))
    with open(chosen.path, "w") as f:
        f.write(storage.read_text(storage.join(output, "chosen.yaml")))
    chosen.metadata.update(go=report["beats_no_synthesis"], chosen=report["chosen"], url=storage.join(output, "chosen.yaml"))
    return bool(report["beats_no_synthesis"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pilot_config(chosen: Input[Artifact]) -> str:
    """The pilot's chosen run config as the run pipeline's ``config`` parameter (JSON)."""
    import json

    import yaml

    with open(chosen.path) as f:
        return json.dumps(yaml.safe_load(f))
