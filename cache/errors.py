"""The exception types every layer raises, so they live at the bottom.

``UserError`` means "the user asked for something we cannot do": the ``pipeline`` command prints
it as one line ``Error: ...`` with exit code 2, never a traceback. ``BadImage`` is an image (or
its cached pixels) that cannot be used.
"""


class UserError(Exception):
    """Bad input, or a state of the run folder that needs the user's action."""


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in the index."""
