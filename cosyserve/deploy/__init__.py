"""Running cosyserve on a cluster engine. ``ray_serve`` (the optional ``cosyserve[ray]`` extra)
is the Ray Serve application; ``options`` reads its arguments without importing Ray. Nothing
in the core package imports this package."""
