"""Models, datasets, partitioning and train/test loops shared by server and client.

Nothing in this package imports Flower: it is plain PyTorch, numpy and the
``flwr-datasets`` partitioners, usable and testable on its own.
"""
