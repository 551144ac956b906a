"""Evaluation metrics: binary classification at a threshold, ROC, and summaries over studies.

scikit-learn computes them (a declared dependency); it is imported on use, so importing this
module stays cheap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["binary_metrics", "roc_points", "summary"]


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, ROC AUC and confusion counts of scores at ``threshold``.

    >>> m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    >>> m["accuracy"], m["roc_auc"]
    (0.75, 1.0)
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, int)
    scores = np.asarray(scores, float)
    y_pred = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both = len(np.unique(y_true)) == 2
    return {
        "n": int(y_true.size), "positives": int(y_true.sum()), "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, scores)) if both else None,
        "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
    }


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates of the ROC curve and its area (needs both classes).

    >>> fpr, tpr, auc = roc_points(np.array([0, 1, 1]), np.array([0.2, 0.4, 0.9]))
    >>> auc
    1.0
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y_true, scores)
    return fpr, tpr, float(roc_auc_score(y_true, scores))


def summary(values: list[float | None]) -> dict[str, Any]:
    """Count, mean and median of the values that are not None (None when there are none).

    >>> summary([0.5, None, 1.0])
    {'n': 2, 'mean': 0.75, 'median': 0.75}
    """
    v = np.array([x for x in values if x is not None], float)
    return {"n": int(v.size), "mean": float(v.mean()) if v.size else None,
            "median": float(np.median(v)) if v.size else None}
