"""`mofi write`: the I2E WebDataset shards, their sidecars and manifest (``stage``)."""
