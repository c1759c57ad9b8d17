"""Proof that each real engine started by deploy/local/engines.sh is real and working."""
