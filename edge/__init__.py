"""splitrelay.edge."""
