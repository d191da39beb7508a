"""Data shipped inside the package, found through `importlib.resources`.

    models/*.yml   model configs (link to the repository's configs/models/)
    kd-lambda.yml  the paper's Table 7 KD weights (link to configs/kd-lambda.yml)
    bulks.pkl      the embedded OC20-format bulk database (link to data/bulks.pkl)

The top-level configs/ and data/ folders are the source of truth; in the repository these entries
are symlinks to them, and a wheel carries copies (pyproject package-data), so an installed kdaug
finds them without the repository.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from kdaug.errors import KdaugError


def resource_path(name: str) -> Path:
    """File-system path of the packaged resource `name` ("models", "kd-lambda.yml" or "bulks.pkl")."""
    resource = files(__name__).joinpath(name)
    if not isinstance(resource, Path):
        msg = f"kdaug's packaged {name} is not on the file system ({resource}); install kdaug unzipped"
        raise KdaugError(msg)
    return resource
