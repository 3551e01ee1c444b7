"""The one error type of the converter: a wrong input, explained in one line with what to do."""


class ConversionError(ValueError):
    """A checkpoint or option the converter cannot use; the message says what to do instead.

    The CLI prints it as ``error: <message>`` and exits with status 2.
    """
