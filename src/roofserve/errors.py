class UserError(Exception):
    """A mistake the user can fix. The CLI prints its message on one line, with no traceback."""
