"""toolkit: model merging by uncertainty-based gradient matching (Daheim et al., ICLR 2024)."""
from .curvature import fisher
from .errors import MergeError
from .merge import METHODS, merge_models, merge_state_dicts, merge_tensor, register
from . import masknodes as _masknodes, regmean as _regmean  # noqa: F401  (register their methods)

__all__ = ["MergeError", "METHODS", "fisher", "merge_models", "merge_state_dicts", "merge_tensor", "register"]
__version__ = "0.1.0"
