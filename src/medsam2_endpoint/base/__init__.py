"""The ground every layer may import: typed domain errors, the byte-bounded LRU, heap release. Imports nothing of the package."""
