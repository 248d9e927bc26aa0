"""The ``dymu`` command line: thin sub-commands that parse, load config and call the library."""
