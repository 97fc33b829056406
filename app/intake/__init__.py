"""Step 1 of the request's path: receive the upload and judge it, for free.

- ``receive``: stream the body in (multipart or raw), cap it, hash it (:class:`Upload`),
  and the per-process cap on uploads in flight (:class:`UploadGate`);
- ``spool``: where the bytes stay meanwhile (memory within a budget, else disk);
- ``sniff``: is it an image ailabapi will accept — format, size, structure — without
  decoding a pixel.
"""

from app.intake.receive import IntakeLimits, Upload, UploadGate, receive
from app.intake.sniff import ImageError, ImageFacts

__all__ = ["ImageError", "ImageFacts", "IntakeLimits", "Upload", "UploadGate", "receive"]
