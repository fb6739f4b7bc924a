"""Evaluating and timing exported models: evaluate, bench, plots."""
