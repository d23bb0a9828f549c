"""Model families (behind the ModelFamily protocol) and the tiny offline pipelines."""
