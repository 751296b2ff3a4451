"""rsseg: remote-sensing segmentation from labelled scenes to a served model."""

__version__ = "0.1.0"
