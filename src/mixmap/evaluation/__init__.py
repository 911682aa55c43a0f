"""Scoring maps against a simulation's truth (:mod:`.scores`), the Bayes-optimal reference
(:mod:`.bayes`), and fit folders against simulation folders (:mod:`.dirs`)."""

from mixmap.evaluation.bayes import bayes_reference
from mixmap.evaluation.dirs import evaluate_dirs, metrics_markdown
from mixmap.evaluation.scores import angular_error, metrics

__all__ = ["angular_error", "bayes_reference", "evaluate_dirs", "metrics", "metrics_markdown"]
