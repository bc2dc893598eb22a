"""Transfers: chosen imaging studies relayed into a requester's PACS as durable, resumable jobs."""
