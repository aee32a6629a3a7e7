"""One module per stage of the report; each exposes `run(config, workdir)`."""
