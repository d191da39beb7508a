"""Frame conversion and LMDB storage."""
