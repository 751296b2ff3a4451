"""MLflow's models-from-code entry for a registered version (rsseg.pyfunc): MLflow runs this file to build the
pyfunc model instead of unpickling one."""

from mlflow.models import set_model

from rsseg.pyfunc import TileSegmenter

set_model(TileSegmenter())
