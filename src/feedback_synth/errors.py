"""Errors that name what is wrong: which file, which class, which field."""


class FeedbackSynthError(Exception):
    """Base class: every error a user should read, not a traceback to debug."""


class ConfigError(FeedbackSynthError, ValueError):
    """A config value has the wrong type or range, or a key is unknown."""


class DataError(FeedbackSynthError, ValueError):
    """A dataset is missing, unreadable, empty or inconsistent."""


class TrackingError(FeedbackSynthError, RuntimeError):
    """The MLflow tracking server could not be reached or refused a request."""
