"""Shared pytest configuration.

tests/test_fsdp.py is the ladder harness, a script that torchrun launches once per rank;
pytest must not import it as a test module.
"""

collect_ignore = ["test_fsdp.py"]
