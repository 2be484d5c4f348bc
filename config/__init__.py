"""Workflow configs: schema.yaml (shipped as package data) and the demo run's demo.yaml."""
