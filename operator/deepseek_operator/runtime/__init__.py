"""The kopf runtime: the CLI (cli), the handlers that queue reconciles (handlers), the reconcile
loop (reconcile), the Kubernetes I/O (k8s), leader election (leadership) and Prometheus metrics
(metrics). The only part of the operator that imports kopf or the kubernetes client."""
