"""The ``lorafleet`` command line: thin commands that parse, call the library and print
(``main`` dispatches; one module per command family)."""
