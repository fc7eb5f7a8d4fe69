"""The jaxpr analysis of a loss and ``detect`` / ``verify``."""
