"""jacext's error type."""


class JacextError(RuntimeError):
    """Raised when jacext cannot compute an asked-for quantity; the message says what to do."""
