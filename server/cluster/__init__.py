"""Scale-out on Ray Serve: an ingress with the same HTTP API in front of N engine replicas, each a whole single
server on one shared adapter repository, routed by Ray Serve's model multiplexing keyed by tenant and adapter id.
Needs the `cluster` extra (`pip install 'lora-server[cluster]'`); nothing else in the package imports Ray."""
