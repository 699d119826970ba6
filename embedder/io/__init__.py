"""Sources and sinks: Parquet input and output, the work folder that makes runs resumable, atomic writes."""
