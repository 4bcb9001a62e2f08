"""Intake: bytes in, page images sized for the model out.

Type comes from magic bytes, limits are checked before any expensive work
(page count before rendering, pixel count before decoding), and pages are
rendered one at a time on demand so a long PDF never sits in memory whole.
"""

from app.intake.document import Document, EncodedPage, IntakeLimits, open_document
from app.intake.pages import parse_page_selection
from app.intake.sniff import DocType, sniff

__all__ = ["DocType", "Document", "EncodedPage", "IntakeLimits", "open_document", "parse_page_selection", "sniff"]
