# A package so that this folder's conftest.py is imported as ``benchmarks.conftest`` and does not
# replace ``tests/conftest.py`` (imported as ``conftest`` by the unit tests) when both are collected.
