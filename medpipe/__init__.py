"""medpipe: batch processing of medical imaging archives.

The library (this package) is plain functions on arrays and paths; it never imports Prefect.
``tasks/`` wraps these functions as Prefect tasks and ``flows/`` composes them.
"""

__version__ = "0.1.0"
