"""The inference service's small parts; ``app.create_app`` puts them together."""
