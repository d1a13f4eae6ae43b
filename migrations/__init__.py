"""Alembic migrations for the CivicPulse schema, run by `civicpulse migrate`."""
