"""Training recipes: the loss and sampler of the baseline and of retraining, and what a checkpoint
was trained with (docs/method.md: Balanced retraining)."""
from __future__ import annotations

from feedback_synth import storage
from feedback_synth.config import RetrainConfig, TrainConfig


def baseline_recipe(cfg: TrainConfig):
    """The baseline's loss and sampler (``training.train.Recipe``)."""
    from feedback_synth.training.losses import LOSSES
    from feedback_synth.training.train import Recipe

    return Recipe(LOSSES.check(cfg.loss, "train.loss"), cfg.tau, cfg.balanced_sampler)


def retrain_recipe(cfg: RetrainConfig, baseline_model_url: str):
    """Retraining's loss and sampler: its own where set, else the baseline's (read from the
    baseline checkpoint's ``train_config.yaml``), so that the run's delta is the gain of synthesis
    over the same recipe without it."""
    from feedback_synth.training.losses import LOSSES
    from feedback_synth.training.train import Recipe

    base = recipe_of(baseline_model_url)
    return Recipe(LOSSES.check(cfg.loss or base.loss, "retrain.loss"), cfg.tau if cfg.tau is not None else base.tau,
                  cfg.balanced_sampler if cfg.balanced_sampler is not None else base.balanced_sampler, cfg.prior)


OPTIM_FIELDS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "augment", "seed")


def same_training(recipe, base_recipe, cfg: RetrainConfig, baseline_model_url: str) -> bool:
    """Would the baseline's training, with no synthetic image, be retraining's? (loss, tau,
    sampler and optimiser; the prior only matters once synthetic images are mixed in)"""
    base = (storage.read_yaml(storage.join(baseline_model_url, "train_config.yaml")) or {}).get("train") or {}
    same_optim = all(base.get(f) == getattr(cfg, f) for f in OPTIM_FIELDS)
    return same_optim and (recipe.loss, recipe.tau, recipe.balanced_sampler) == (
        base_recipe.loss, base_recipe.tau, base_recipe.balanced_sampler)


def recipe_of(model_url_: str):
    """The recipe a checkpoint was trained with (its ``train_config.yaml``)."""
    return recipe_from(storage.read_yaml(storage.join(model_url_, "train_config.yaml")) or {})


def recipe_from(saved: dict):
    """The recipe in a checkpoint's ``train_config.yaml``, already read."""
    from feedback_synth.training.train import Recipe

    if "recipe" in saved:
        return Recipe(**saved["recipe"])
    train = saved.get("train") or {}
    return Recipe(train.get("loss", "ce"), float(train.get("tau", 1.0)), bool(train.get("balanced_sampler", False)))
