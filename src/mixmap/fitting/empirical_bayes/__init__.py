"""Empirical Bayes: refitting a learned mixture prior to the scan by maximum marginal
likelihood, by Monte-Carlo EM (:mod:`.monte_carlo`) or on a quadrature grid (:mod:`.grid`)."""
