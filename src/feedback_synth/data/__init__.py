"""Datasets: the built-in digits (long-tailed and group-imbalanced), image datasets from any fsspec URL,
and the prepared dataset folder (one .npz per split + info.json) that every stage reads.

A URL dataset is scanned (layout -> rows), checked without pixels (``prepare.scan_dataset``, the
pre-flight check), then read (``prepare.prepare_dataset``); see ``sources``.
"""
