"""Shared fixtures. Tests mirror the package layout and build small real inputs in tmp dirs."""

from __future__ import annotations

import os

# Quiet TensorFlow's C++ logging and keep it from grabbing every core in each test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
