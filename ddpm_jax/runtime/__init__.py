"""Runtime plumbing: devices and the mesh, storage, console, metrics, CPU defaults, images."""
