"""Reports: README tables (readme), computed notebook readings (reading), executed-notebook cleaning (notebook)."""
