"""LightOnOCR Service: documents to markdown with LightOnOCR-2-1B."""

__version__ = "0.1.0"
