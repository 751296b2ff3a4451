"""MLflow entry points: thin modules that parse flags and call the rsseg library."""
