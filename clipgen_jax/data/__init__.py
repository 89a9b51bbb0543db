"""Data: the Shapes world, image sources and grain pipelines."""
