"""Deployment helpers: Kubernetes manifests (``infercore deploy k8s``) and a health probe.

Nothing here is imported by the server; :mod:`infercore.deploy.probe` uses the standard
library only, so container health checks stay cheap.
"""
