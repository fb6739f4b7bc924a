"""dgate: retrofit decision gates onto pretrained image classifiers so that easy inputs exit early.

Example:
    >>> import dgate_cli
    >>> model = dgate_cli.load("models/r56-gated")  # doctest: +SKIP
    >>> out = model(images)  # doctest: +SKIP
    >>> out.pred, out.exit  # doctest: +SKIP
"""

from ._version import __version__
from .runtime.backends.malloc import tune_malloc
from .runtime.loading import load
from .runtime.model import GatedModel, GatedOutput

__all__ = ["GatedModel", "GatedOutput", "__version__", "load", "tune_malloc"]
