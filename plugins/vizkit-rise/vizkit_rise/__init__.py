"""vizkit-rise: the RISE attribution method as a vizkit plugin (``vizkit method=rise``)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Rise", "RiseConfig"]

from vizkit_rise.rise import Rise, RiseConfig
