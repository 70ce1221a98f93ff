"""Routing policies: plugins of the `router` slot, evaluated in the router process."""
