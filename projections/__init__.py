"""Read models and the streaming projector runtime."""
