"""Experiment tracking: the tracker interface, the MLflow tracker and client, the pyfunc model."""
