"""Training-free sparse safety weight editing."""
