"""The one exception type the toolkit raises for bad input."""


class MergeError(ValueError):
    """Bad input to a merge, an estimator or a checkpoint command; the message names the problem."""
