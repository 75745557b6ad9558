"""The embedded PithTrain framework: a compact implementation of the seed (v1) protocol.

Model-facing names, signatures and module paths follow upstream PithTrain so that
pithlint's rules, its tests and upstream model files share one vocabulary; performance
devices (streams, Triton kernels, FP8, weight-gradient delay) are left out. The package is
not installed: put the repository root on ``PYTHONPATH``.
"""
