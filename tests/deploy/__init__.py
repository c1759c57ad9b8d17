"""Checks of the deployment files under deploy/ (no container engine needed)."""
