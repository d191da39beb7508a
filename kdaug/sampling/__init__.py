"""Sampling adsorbate+slab systems (fairchem-data-oc)."""
