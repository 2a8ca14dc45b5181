"""Neural-network building blocks shared across packages (a leaf: imports nothing from fsmoe)."""
