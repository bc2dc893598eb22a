"""Mitz, the Dutch national consent service: its wire formats, client, simulator side and doors.

Every disclosure is gated by Mitz, so the codecs (:mod:`.xacml`, :mod:`.xcpd`, :mod:`.fhir`, sharing
:mod:`.codec`) are pure and strict, and closed answers fail closed.
"""
