"""ClientApp: local training and evaluation on the node's shard and device."""
