"""The NIST XDS Toolkit XCA / XCA-I test cases as tests, one per case, named after the NIST id.

docs/conformance.md maps every case of DUO's four actors to its test here, or says why it does not apply.
"""
