"""The `turbowan` command line: one module per subcommand."""
