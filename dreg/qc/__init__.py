"""Measures of a registration's quality."""

from dreg.qc.accuracy import field_error

__all__ = ["field_error"]
