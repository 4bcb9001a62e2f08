"""Image encoding shared by engines and the API."""

from __future__ import annotations

import base64
import io

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of the page; the authors always send PNG (lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
