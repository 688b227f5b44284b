"""Everything that is not one of the paper's ideas: run as `python -m tools.NAME` from the repository root.
Tools import the idea modules' public names; no idea module imports a tool."""
