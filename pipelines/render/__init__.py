"""Pictures: heat-map overlays, captioned panels, grid layouts of maps."""
