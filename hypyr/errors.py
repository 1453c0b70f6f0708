class HypyrError(Exception):
    """An error the user can fix; str() is one sentence."""


class VcpuCountError(HypyrError, ValueError):
    """A vCPU count that is not an integer from 1 to the most this host and hypyr allow."""
