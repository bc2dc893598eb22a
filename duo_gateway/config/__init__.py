"""Configuration: one class per concern (Synapse-style), composed by :class:`DuoConfig`."""
