"""Built-in expert placement plugins (slot `expert_placement`): `static` and `eplb`."""
