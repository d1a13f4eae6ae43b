"""Bulk import of city 311 exports into the event log."""
