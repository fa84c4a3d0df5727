"""Single-device attention kernels behind one pass interface (base.py): XLA, Pallas GPU,
cuDNN and splash."""
