"""The client side of HTTP, no torch: clients, load strategies, soak, resource monitor, server processes."""
