"""Guided generation with diffusers: the pipelines, the generator kinds (adapters), loading, the
bundled generator, GPU performance options, resumable shards and the memory estimate.
"""
