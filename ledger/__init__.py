"""Write side of CivicPulse: events, the Postgres event store, commands and imports."""
