"""Running the stages: the stage table both runners are built from, the in-process runner, what both runners share, pre-flight checks and the pilot."""
