"""Scoring maps against a simulation's truth, and the Bayes-optimal reference."""

from mixmap.evaluation.scores import (
    angular_error,
    bayes_reference,
    evaluate_dirs,
    metrics,
    metrics_markdown,
)

__all__ = ["angular_error", "bayes_reference", "evaluate_dirs", "metrics", "metrics_markdown"]
