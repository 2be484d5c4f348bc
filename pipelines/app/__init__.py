"""What users touch: the `featscope` command line, the static report and the query service."""
