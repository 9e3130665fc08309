"""Model builders: chains of Flax stages for the papers' networks."""
