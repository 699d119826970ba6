"""Make validated graphs: export (the only torch importer), the CPU rewrite, CUDA fusion, int8, fp16, their gates, and the cache."""
