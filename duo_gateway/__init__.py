"""duo-gateway: one national imaging timeline across the TLB network and IHE XCA communities."""

__version__ = "0.1.0"
