"""PTL107-PTL112: the model-level protocol (records, backward, layer partition, edge
modules, process groups, per-forward state)."""
