"""The one error type of the data package."""


class DataError(ValueError):
    """Bad input data, tokenizer or corpus; the message names the file (and
    line or key) and the fix."""
