"""Drafters: propose tokens cheaply for the target to verify."""
