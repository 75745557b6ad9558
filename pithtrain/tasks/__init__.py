"""Tasks run from the command line on checkpoints and models (``python -m pithtrain.tasks.<task>``)."""
