"""The dgate error tree.

Every error dgate raises on bad input is a :class:`DgateError` whose message is one line that
names the problem and the fix. Each class also subclasses the builtin that fits, so callers can
catch ``ValueError`` or ``FileNotFoundError`` as they would with any other library. The CLI turns
these into a one-line message and exit code 2.
"""

from __future__ import annotations


class DgateError(Exception):
    """Base class for every error dgate raises on purpose."""


class SpecError(DgateError, ValueError):
    """A model, data, gate or weights specification that cannot be understood."""


class UntrustedCodeError(SpecError):
    """A model spec read from a file names user code that the caller did not allow to run."""


class WeightsError(DgateError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(DgateError, ValueError):
    """A dataset that cannot be used (no images, wrong classes, unreadable files)."""


class MissingFileError(DgateError, FileNotFoundError):
    """A file or directory that dgate needs does not exist."""


class CacheMismatchError(DgateError, ValueError):
    """A run directory or feature cache that belongs to another model, weights, gates or data."""


class BusyError(DgateError, RuntimeError):
    """A run directory that another dgate process is writing."""


class NotFittedError(DgateError, ValueError, AttributeError):
    """An estimator or run step used before the step it depends on."""


class ManifestError(DgateError, ValueError):
    """A gated-model manifest or weights file that is corrupt, of an unknown version or tampered with."""


class TargetUnreachableError(DgateError, ValueError):
    """No thresholds reach the requested accuracy on the calibration split.

    Attributes:
        best_accuracy: the highest accuracy any thresholds reach (the backbone's, all gates closed,
            or higher where gates correct the backbone).
        backbone_accuracy: the backbone's own accuracy on the same split.
    """

    def __init__(self, message: str, best_accuracy: float, backbone_accuracy: float):
        super().__init__(message)
        self.best_accuracy = best_accuracy
        self.backbone_accuracy = backbone_accuracy
