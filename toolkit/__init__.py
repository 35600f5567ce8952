"""toolkit: model merging by uncertainty-based gradient matching (Daheim et al., ICLR 2024)."""
from .errors import MergeError
from .merge import METHODS, merge_models, merge_state_dicts, merge_tensor, register
from . import masknodes as _masknodes, regmean as _regmean  # noqa: F401  (register their methods)

__all__ = ["MergeError", "METHODS", "fisher", "merge_models", "merge_state_dicts", "merge_tensor", "register"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`toolkit.fisher` imports toolkit.curvature (and its backends) on first use, so the merge
    CLI and `import toolkit.stream`, which never estimate a Fisher, do not pay for it at startup."""
    if name == "fisher":
        from .curvature import fisher
        return fisher
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
