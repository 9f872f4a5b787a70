"""Aggregation math, update validation and the Flower strategy of fedcoord."""
