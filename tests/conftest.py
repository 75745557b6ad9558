"""Shared pytest configuration.

tests/test_fsdp.py is the ladder harness, a script that torchrun launches once per rank;
pytest must not import it as a test module. Fixture projects under tests/fixtures/ hold
files that the linter reads (some deliberately broken); they are not tests either.
"""

collect_ignore = ["test_fsdp.py"]
collect_ignore_glob = ["fixtures/*"]
