"""Built-in masking strategies, one module each (installed as ``masking_bench.strategies``).

Every module here is imported on discovery; a class decorated with ``@register`` becomes available
by its ``name`` in suites and on the command line.
"""
