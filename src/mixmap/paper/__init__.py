"""Reproducing the paper's figures and tables, and the demo; outside the core library."""
