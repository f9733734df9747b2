"""Datasets: the built-in digits (long-tailed and group-imbalanced), image datasets from any fsspec URL,
and the prepared dataset folder (one .npz per split + info.json) that every stage reads.
"""
