"""DUO as the XCA(-I) Responding Gateway of the TLB community: semantics (service) and HTTP edge
(transport) apart, as in Synapse's federation split."""
