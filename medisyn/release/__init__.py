"""The release stage: an audited synthetic set as a dataset others can load, with its card."""
