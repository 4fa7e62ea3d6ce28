"""vizkit-sparsity: the Gini index of attribution maps as a vizkit metric plugin (``metrics=[gini]``)."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Gini", "gini_index"]

from vizkit_sparsity.gini import Gini, gini_index
