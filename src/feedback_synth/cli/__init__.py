"""The command line, ``feedback-synth``: a thin shell over the library (and feedback_synth_kfp for the KFP verbs)."""
from feedback_synth.cli.main import main


def console_main() -> None:
    """The ``feedback-synth`` command: :func:`main`, then the process ends without the interpreter's
    teardown of torch, diffusers and MLflow (2-3 s of every command, measured). ``main`` returns
    once its outputs are closed; an uncaught error still ends the usual way, with its traceback."""
    from feedback_synth.interrupts import exit_without_teardown

    exit_without_teardown(main())


__all__ = ["console_main", "main"]
