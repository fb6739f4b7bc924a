"""The ``dgate`` command line: parses arguments, calls the library, renders the results."""
