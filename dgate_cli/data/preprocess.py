"""Image preprocessing: decode and resize in the loader workers, normalise batches on the device.

Workers produce ``uint8`` tensors (four times less to copy between processes and to the GPU);
:meth:`Preprocess.normalize` turns a batch into the float input the model expects, with exactly the
arithmetic of torchvision's ``ImageClassification`` transform (``x / 255``, ``- mean``, ``/ std``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..errors import DataError, SpecError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what PIL raises on a broken, truncated or oversized file (DecompressionBombError is no OSError)
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    struct.error,
    Image.DecompressionBombError,
)
_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _decode_error_message(path: str, exc: BaseException) -> str:
    """The one-line message for an image file PIL cannot decode."""
    detail = " ".join(str(exc).split()) or "no details"
    fix = "fix or remove the file"
    if isinstance(exc, Image.DecompressionBombError):
        fix = "it is too large to decode safely: downscale or remove the file"
    return f"cannot read image {path} ({type(exc).__name__}: {detail}); {fix}"


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input.

    Attributes:
        resize: resize the shorter side to this many pixels (None: keep the size).
        crop: centre-crop to this square size (None: no crop).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.

    Example:
        >>> p = Preprocess(resize=256, crop=224)
        >>> p.input_size(fallback=32)
        224
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise SpecError(f"--interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std):
            raise SpecError(f"--mean has {len(self.mean)} values and std {len(self.std)}; give one per channel")
        if any(s <= 0 for s in self.std):
            raise SpecError(f"--std values must be positive, got {self.std}")
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SpecError(f"--{name} must be a positive number of pixels, got {v}")

    def input_size(self, fallback: int) -> int:
        """The square input size the model sees (crop, else resize, else ``fallback``)."""
        return self.crop or self.resize or fallback

    def load(self, path: str) -> torch.Tensor:
        """Decode an image file to a ``uint8`` CHW tensor, resized and cropped.

        Raises:
            DataError: the file cannot be decoded (broken, truncated, not an image, or so large that
                PIL refuses it as a decompression bomb); one line naming the file.
        """
        try:
            with Image.open(path) as img:
                return self.from_pil(img)
        except DECODE_ERRORS as exc:
            raise DataError(_decode_error_message(path, exc)) from exc

    def from_pil(self, img: Image.Image) -> torch.Tensor:
        """Resize and crop a PIL image and return a ``uint8`` CHW tensor."""
        img = img.convert("RGB")
        if self.resize is not None:
            img = TF.resize(img, [self.resize], interpolation=_INTERPOLATIONS[self.interpolation])
        if self.crop is not None:
            img = TF.center_crop(img, [self.crop])
        return TF.pil_to_tensor(img)

    def __call__(self, images: Image.Image | torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """The model input for ``images``, as torchvision's ``weights.transforms()`` gives it.

        A PIL image or a ``uint8`` CHW tensor gives a float CHW tensor; a list of PIL images or a
        ``uint8`` NCHW batch gives a float NCHW batch (resized, cropped and normalised).

        Example:
            >>> p = Preprocess(crop=24, mean=(0.5,) * 3, std=(0.5,) * 3)
            >>> p(Image.new("RGB", (32, 32), (255, 0, 0))).shape
            torch.Size([3, 24, 24])
            >>> p(Image.new("RGB", (32, 32), (255, 0, 0)))[:, 0, 0].tolist()
            [1.0, -1.0, -1.0]
        """
        if isinstance(images, Image.Image):
            return self.normalize(self.from_pil(images)[None])[0]
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() not in (3, 4):
                raise DataError(
                    f"preprocess takes uint8 images (CHW or NCHW), got a {images.dtype} tensor of shape "
                    f"{tuple(images.shape)}; pass PIL images or uint8 pixels"
                )
            batch = self._resize_crop(images if images.dim() == 4 else images[None])
            out = self.normalize(batch)
            return out if images.dim() == 4 else out[0]
        images = list(images)
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise DataError("preprocess takes a PIL image, a list of PIL images or a uint8 tensor")
        return self.normalize(torch.stack([self.from_pil(im) for im in images]))

    def _resize_crop(self, batch: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            batch = TF.resize(batch, [self.resize], interpolation=_INTERPOLATIONS[self.interpolation], antialias=True)
        if self.crop is not None:
            batch = TF.center_crop(batch, [self.crop])
        return batch

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Turn a ``uint8`` NCHW batch into the normalised float input, on the batch's device."""
        x = batch.to(dtype).div_(255)
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            resize=d.get("resize"),
            crop=d.get("crop"),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
            interpolation=d.get("interpolation", "bilinear"),
        )

    def override(self, **changes: Any) -> Preprocess:
        """Return a copy with the non-None ``changes`` applied (``resize=0`` / ``crop=0`` remove a step)."""
        d = self.to_dict()
        for k, v in changes.items():
            if v is None:
                continue
            d[k] = None if k in ("resize", "crop") and v == 0 else v
        return Preprocess.from_dict(d)


def from_torchvision_weights(weights: Any) -> Preprocess:
    """Read the preprocessing torchvision's weights enum declares (no download needed)."""
    t = weights.transforms()
    interp = getattr(t, "interpolation", InterpolationMode.BILINEAR)
    return Preprocess(
        resize=int(t.resize_size[0]) if getattr(t, "resize_size", None) else None,
        crop=int(t.crop_size[0]) if getattr(t, "crop_size", None) else None,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=interp.value if isinstance(interp, InterpolationMode) else str(interp),
    )
