"""Applications built on lstmkit."""
