"""splitrelay.cli."""
