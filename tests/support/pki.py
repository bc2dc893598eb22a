"""The test PKI is the simulated network's throwaway PKI (duo_gateway.sim.pki)."""

from duo_gateway.sim.pki import CertPair, KeyType, Pki, make_pki, new_key

__all__ = ["CertPair", "KeyType", "Pki", "make_pki", "new_key"]
