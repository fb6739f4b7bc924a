"""dgate: retrofit decision gates onto pretrained image classifiers so that easy inputs exit early.

Example:
    >>> import dgate_cli
    >>> model = dgate_cli.load("models/r56-gated")  # doctest: +SKIP
    >>> out = model(images)  # doctest: +SKIP
    >>> out.pred, out.exit  # doctest: +SKIP
"""

from ._malloc import tune_malloc
from ._version import __version__
from .export import load
from .runtime import GatedModel, GatedOutput

__all__ = ["GatedModel", "GatedOutput", "__version__", "load", "tune_malloc"]
