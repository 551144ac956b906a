"""Fixtures for inference tests (the helpers live in inference_helpers.py)."""

from inference_helpers import study, tiny_model, tiny_segmenter  # noqa: F401  (fixtures)
