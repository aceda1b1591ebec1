"""The one exception type that means "the user asked for something we cannot do".

It lives at the bottom so every layer can raise it; the ``pipeline`` command prints it as one
line ``Error: ...`` with exit code 2, never a traceback.
"""


class UserError(Exception):
    """Bad input, or a state of the run folder that needs the user's action."""
