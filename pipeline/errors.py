"""The one exception type a user sees: what is wrong, where, and what to do."""


class PipelineError(Exception):
    """Bad input or a state the user can fix. The CLI prints it without a traceback."""


def first_few(items, n: int = 5) -> str:
    """Format the first ``n`` items of a sequence for an error message, with the total count."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return f"{shown}{more}"
