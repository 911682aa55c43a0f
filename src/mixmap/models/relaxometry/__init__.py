"""Relaxometry signal models: signals over echo times, inversion times or flip angles."""
