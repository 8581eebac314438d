"""roofserve: serve models with LitServe and measure how close they run to the hardware's roof."""

__version__ = "0.1.0"
