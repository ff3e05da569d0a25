"""Command-line scripts, one per subcommand of `hf-mlsafety`, each with `make_parser()` and `main()` like TRL's."""
