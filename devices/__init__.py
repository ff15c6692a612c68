"""edgekv.devices: board profiles and the footprint profiler."""
