"""The control plane: a REST API over runs executing as detached Ray actors (see app.create_app)."""
