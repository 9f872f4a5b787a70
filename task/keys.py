"""Keys of the records exchanged between ServerApp and ClientApp, in one place."""

# RecordDict entries
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

# ConfigRecord entries sent by the server
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
# async mode: the model version a training starts from (server-round: the node's k-th training)
MODEL_VERSION = "model-version"
BYZANTINE = "byzantine"

# MetricRecord entries sent back by clients
NUM_EXAMPLES = "num-examples"
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
TRAIN_SECONDS = "train-seconds"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"

# ConfigRecord entries sent back by clients (strings)
DEVICE = "device"

# node_config keys
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_DATA_PATH = "data-path"
