"""The `lorakit` command line: one module per subcommand."""
