"""The embedded default dataset: generated sea-ice-like scenes, used when the user gives no data."""

from __future__ import annotations

import logging
from pathlib import Path

from rsseg.data.prepare import prepare_dataset
from rsseg.data.synthetic import generate_seaice

log = logging.getLogger(__name__)

# Where prepared datasets go unless the user names a folder (relative to the working directory).
PREPARED_ROOT = Path("data/prepared")
GENERATED_SOURCE = Path("data/generated/seaice")
GENERATED_PREPARED = PREPARED_ROOT / "generated-seaice"
# Small enough for the README's first command to train in minutes on a 2-core CPU.
GENERATED_SCENES = 12
GENERATED_SIZE = 512
GENERATED_TILE = 256
GENERATED_OVERLAP = 64


def default_dataset(root: Path = Path(".")) -> Path:
    """Generate (once) and prepare (once) the default dataset under `root`; return the prepared folder."""
    source, prepared = root / GENERATED_SOURCE, root / GENERATED_PREPARED
    if not (prepared / "dataset_spec.json").is_file():
        if not source.is_dir():
            log.info("no data given: generating %d sea-ice-like scenes in %s", GENERATED_SCENES, source)
            generate_seaice(source, scenes=GENERATED_SCENES, size=GENERATED_SIZE, seed=0)
        # A marked prepare output that lost its spec is ours to redo; any other folder there is still refused.
        prepare_dataset(source, prepared, tile_size=GENERATED_TILE, overlap=GENERATED_OVERLAP, overwrite=True)
    return prepared
