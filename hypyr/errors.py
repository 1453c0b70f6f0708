class HypyrError(Exception):
    """An error the user can fix; str() is one sentence."""
