"""Replay: folding the log as of a past moment."""
