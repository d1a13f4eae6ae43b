"""HTTP API and command line of CivicPulse."""
