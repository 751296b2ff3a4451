"""Raster I/O, dataset preparation, tiling, torch datasets and transforms."""
