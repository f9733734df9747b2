"""The checks a run makes before any work: a bad value stops it at once, with a one-line error."""
from __future__ import annotations

import os

from feedback_synth import storage
from feedback_synth.config import RunConfig
from feedback_synth.errors import ConfigError, DataError


def check_names(cfg: RunConfig) -> None:
    """Names that plugins define (criteria, filters, losses) are known to their registries."""
    from feedback_synth.guidance.criteria import CRITERIA
    from feedback_synth.synthesis.filtering import FILTERS
    from feedback_synth.training.losses import LOSSES

    CRITERIA.check(cfg.generate.criterion, "generate.criterion")
    for name in cfg.filter.filters:
        FILTERS.check(name, "filter.filters")
    LOSSES.check(cfg.train.loss, "train.loss")
    if cfg.retrain.loss:
        LOSSES.check(cfg.retrain.loss, "retrain.loss")


def preflight(cfg: RunConfig) -> None:
    """Checks that need no long work, run before any: a bad value stops the run at once."""
    import timm

    from feedback_synth.data.prepare import BUILTIN
    from feedback_synth.generation.loading import BUILTIN_GENERATOR, builtin_generator_path

    check_names(cfg)
    builtin = cfg.data.dataset in BUILTIN
    if not builtin and not storage.exists(cfg.data.dataset):
        raise DataError(f"dataset not found: {cfg.data.dataset}")
    if not timm.is_model(cfg.train.model):
        raise ConfigError(f"config field 'train.model': unknown timm model '{cfg.train.model}'")
    if cfg.generate.generator == BUILTIN_GENERATOR:
        if not builtin:
            raise ConfigError("config field 'generate.generator': the bundled generator only knows the built-in "
                              f"datasets; dataset '{cfg.data.dataset}' needs a diffusers model folder URL")
        if not os.path.isdir(builtin_generator_path(cfg.data.dataset)):
            raise ConfigError(f"config field 'generate.generator': no bundled generator for '{cfg.data.dataset}'")
    elif not storage.exists(cfg.generate.generator):
        raise DataError(f"generator model folder not found: {cfg.generate.generator}")
    if cfg.feedback.per_group and cfg.data.dataset == "digits-lt":
        raise ConfigError("config field 'feedback.per_group': digits-lt has no groups")
