"""The application for a Ray Serve config file (KubeRay's RayService, `serve run`): `import_path:
lora_server.cluster.deployment:app`, with `args: {serve_argv: [...]}` (the `lora-server serve` flags) and the engine
deployment's replicas, resources and autoscaling set in the config's `deployments`."""

from lora_server.cluster.app import build_application


def app(args: dict):
    return build_application(list(args.get("serve_argv", [])), num_replicas=1, num_gpus=0.0, num_cpus=1.0)
