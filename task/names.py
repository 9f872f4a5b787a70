"""The valid names of datasets, models and partitioners, without importing torch.

Config parsing and the CLI read these; the modules that implement them import
them from here, so there is one list of each.
"""

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10")
MODEL_NAMES: tuple[str, ...] = ("simple-cnn", "resnet18", "mobilenet-v2")
PARTITIONER_NAMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "shard")
