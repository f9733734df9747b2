"""The pipeline's stages as plain functions, their results, the pre-flight checks and the in-process runner."""
