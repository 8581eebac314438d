"""What every roofserve server adds to LitServe: limits, errors, drain, environment. LitServe internals live in lit.py only."""
