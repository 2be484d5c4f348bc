"""One module per pipeline stage: its options dataclass(es) and `run(rd, options)`.

Stages import `core` and `render`, never each other. `STAGES` lists them in workflow order;
the CLI, the config schema and the Snakefile are derived from their declarations.
"""
