"""The embedded default's world: a procedural renderer with exact labels, and its backbone recipe."""
