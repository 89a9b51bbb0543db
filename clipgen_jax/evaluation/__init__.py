"""Metrics and evaluation of each stage."""
