"""A black-box load generator for lora-server (`lora-loadtest`, or `python -m lora_server.loadtest --help`): S-LoRA's
workload, closed loops and trace replay over plain HTTP, nothing imported from server/."""
